"""AWQ W4A16 weights as LMDeploy `lite auto_awq` writes them (== AutoAWQ "GEMM" layout).

Per linear (in_features K, out_features N): qweight int32 [K, N/8], qzeros int32 [K/group, N/8], scales fp16
[K/group, N], optional bias [N]. Nibble slot i (bits 4i..4i+3) of packed column c holds output channel
c*8 + ORDER[i]. Dense weight W[n, k] = (q[k, n] - zero[k // group, n]) * scale[k // group, n].
"""
import torch
import torch.nn.functional as F
from torch import nn

from services.common.layers import linear, shard_offsets, silu_and_mul

try:
    from services.llm_decoder.models.awq_triton import awq_gemm
except ImportError:  # Triton comes with CUDA builds of torch; CPU runs use the dequantized weight
    awq_gemm = None

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Channel j of a packed column sits in slot ORDER.index(j); shifting by 4 * slot per channel avoids a gather.
_SHIFTS = tuple(4 * ORDER.index(j) for j in range(8))  # (0, 16, 4, 20, 8, 24, 12, 28)


def pack(values: torch.Tensor) -> torch.Tensor:
    """[R, N] integers in 0..15 -> int32 [R, N/8] (8 nibbles per int32, channels interleaved by ORDER)."""
    rows, n = values.shape
    if n % 8:
        raise ValueError(f"packed dimension {n} is not a multiple of 8")
    if ((values < 0) | (values > 15)).any():
        raise ValueError("pack expects values in 0..15")
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=values.device)
    # Sum in int64, then wrap to int32 two's complement: a nibble >= 8 in slot 7 sets the sign bit.
    words = (values.to(torch.int64).view(rows, n // 8, 8) << shifts).sum(-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] -> int32 [R, N] in 0..15; the exact inverse of `pack`."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=packed.device)
    # Arithmetic shift sign-extends negative words; the 0xF mask drops those bits.
    return ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF).flatten(-2)


def quantize(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float16) -> dict:
    """Dense [N, K] -> {qweight, qzeros, scales}: asymmetric uint4 per (output channel, input group).

    scale = (max - min).clamp(min=1e-5) / 15, zero = clamp(-round(min / scale), 0, 15),
    q = clamp(round(w / scale) + zero, 0, 15). The scale is rounded to `scale_dtype` (the checkpoint's fp16)
    before zero and q are computed, so they are the best nibbles for the scale actually stored.
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group size {group_size}")
    w = weight.detach().float().view(n, k // group_size, group_size)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((hi - lo).clamp(min=1e-5) / 15).to(scale_dtype).float()
    zero = (-torch.round(lo / scale)).clamp(0, 15)
    q = (torch.round(w / scale) + zero).clamp(0, 15)
    return {"qweight": pack(q.view(n, k).t().to(torch.int32)),
            "qzeros": pack(zero.squeeze(-1).t().to(torch.int32)),
            "scales": scale.squeeze(-1).t().to(scale_dtype).contiguous()}


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Packed AWQ tensors -> dense weight [N, K] (nn.Linear layout) in `dtype` (default: that of scales)."""
    dtype = dtype or scales.dtype
    k, groups, n = qweight.shape[0], scales.shape[0], scales.shape[1]
    if k != groups * group_size:
        raise ValueError(f"qweight has {k} input rows but scales {groups} groups of {group_size}")
    q = unpack(qweight).view(groups, group_size, n) - unpack(qzeros).unsqueeze(1)
    # fp16 scale x int in -15..15 is exact in fp16/fp32; other targets (bf16) go through fp32, rounding once.
    work = torch.promote_types(scales.dtype, dtype)
    w = q.to(work) * scales.to(work).unsqueeze(1)
    return w.view(k, n).t().to(dtype).contiguous()


def awq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, bias: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) with W kept packed (GPU memory stays at 4 bits per weight; large prefills
    dequantize a transient copy, see awq_triton); gated: of silu_and_mul(x)."""
    if awq_gemm is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        return awq_gemm(x, qweight, qzeros, scales, group_size, bias=bias, gated=gated)  # bias, gating in the kernel
    # No Triton (or fp32 activations): dequantize per call, still without keeping a dense copy.
    x = silu_and_mul(x) if gated else x
    bias = None if bias is None else bias.to(x.dtype)
    return F.linear(x, dequantize(qweight, qzeros, scales, group_size, x.dtype), bias)


class AWQLinear(nn.Module):
    """A 4-bit AWQ linear layer, optionally fusing several projections (q/k/v, gate/up) like FusedLinear.

    `shards` maps each shard id to its output rows, in stacking order (each a multiple of 8); the checkpoint's
    per-shard qweight/qzeros/scales/bias are placed side by side along the output dimension by `load_shard`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int,
                 shards: dict[object, int] | None = None):
        super().__init__()
        sizes = shards or {None: out_features}
        if sum(sizes.values()) != out_features or any(rows % 8 for rows in sizes.values()):
            raise ValueError(f"shards {sizes} must be multiples of 8 summing to out_features {out_features}")
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.offsets = shard_offsets(sizes)
        self.shards = tuple(sizes)  # (None,) when unfused: the loader then copies whole tensors
        groups = in_features // group_size

        def frozen(*shape, dtype):
            return nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)

        # Parameters (not buffers) so load_weights, which walks named_parameters(), fills them.
        self.qweight = frozen(in_features, out_features // 8, dtype=torch.int32)
        self.qzeros = frozen(groups, out_features // 8, dtype=torch.int32)
        self.scales = frozen(groups, out_features, dtype=torch.float16)
        self.bias = frozen(out_features, dtype=torch.float16) if bias else None
        self._dense: torch.Tensor | None = None
        self._dense_key: tuple | None = None

    def load_shard(self, param: nn.Parameter, tensor: torch.Tensor, shard: object) -> None:
        """Copy one projection's tensor into its output columns of `param` (packed dims count N/8)."""
        start, rows = self.offsets[shard]
        packed = param is self.qweight or param is self.qzeros
        dim = 0 if param is self.bias else 1
        div = 8 if packed else 1
        target = param.narrow(dim, start // div, rows // div)
        if tensor.shape != target.shape:
            raise ValueError(f"shard {shard} of shape {tuple(tensor.shape)} does not fit output columns "
                             f"{start}:{start + rows} of {tuple(param.shape)}")
        target.copy_(tensor)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized [N, K] weight, cached until the packed tensors are replaced or written in place."""
        key = (dtype, *((p.data_ptr(), p._version) for p in (self.qweight, self.qzeros, self.scales)))
        if self._dense is None or self._dense_key != key:
            self._dense = dequantize(self.qweight, self.qzeros, self.scales, self.group_size, dtype)
            self._dense_key = key
        return self._dense

    def forward(self, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        """x [..., in_features] (gated: [..., 2 * in_features], of which silu_and_mul is the input)."""
        if x.is_cuda:
            return awq_matmul(x, self.qweight, self.qzeros, self.scales, self.group_size, self.bias, gated)
        # CPU (no fast kernel): dequantize once and keep the dense weight; memory matters less than speed here.
        return linear(x, self.dense_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype), gated)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, shards={self.shards}")
