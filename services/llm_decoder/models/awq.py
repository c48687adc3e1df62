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
    from services.llm_decoder.models.awq_triton import awq_gemm, uses_int4mm
except ImportError:  # Triton comes with CUDA builds of torch; CPU runs use the dequantized weight
    awq_gemm = uses_int4mm = None

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


def int4mm_parts(qweight: torch.Tensor, qzeros: torch.Tensor,
                 scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ tensors -> (nibbles int32 [N, K] in 0..15, scale_and_zero bf16 [K/group, N, 2]) for torch's int4 kernel,
    which dequantizes (q - 8) * scale + zero: AWQ's (q - z) * scale with zero = (8 - z) * scale (of the bf16 scale)."""
    scale = scales.to(torch.bfloat16)
    zero = ((8 - unpack(qzeros)).float() * scale.float()).to(torch.bfloat16)
    return unpack(qweight).t().contiguous(), torch.stack([scale, zero], -1).contiguous()


def int4mm_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The weight [N, K] (fp32) torch's int4 kernel computes with for these AWQ tensors: (q - 8) * scale + zero from
    `int4mm_parts`, before the GPU kernel's rounding of each weight to bf16 (the CPU's keeps fp32)."""
    q, scale_and_zero = int4mm_parts(qweight, qzeros, scales)
    scale, zero = (t.repeat_interleave(group_size, 0).t() for t in scale_and_zero.float().unbind(-1))
    return (q.float() - 8) * scale + zero


def nibble_pairs(q: torch.Tensor) -> torch.Tensor:
    """int32 [N, K] in 0..15 -> uint8 [N, K/2], two nibbles a byte with the even k in the high one: what torch's CUDA
    `_convert_weight_to_int4pack` takes (its int4mm.cu; as gpt-fast and torchao pack)."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


class Int4Pack:
    """A linear's weight in the tile layout of torch's own W4A16 kernel (`aten._weight_int4pack_mm`, gpt-fast's
    "tinygemm": tensor-core tiles of 16 tokens x 8 channels, nibbles dequantized in bf16 registers, fp32 sums, one
    program per 8 channels over all of K), for the table's "int4mm" rows. A kernel torch ships and keeps, with no
    tuning of ours. It takes bf16 activations: others are rounded to bf16, and its bf16 output back to their dtype.
    Kept beside the AWQ tensors, which the Triton and dense paths read: 0.5 byte more per weight."""

    GROUPS = (32, 64, 128, 256)  # the group sizes the kernel is built for

    def __init__(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int):
        k, n = qweight.shape[0], scales.shape[1]
        if not self.supports(n, k, group_size, qweight.device):
            raise ValueError(f"torch's int4 kernel does not take N={n}, K={k}, group {group_size} "
                             f"on {qweight.device.type}")
        q, self.scale_and_zero = int4mm_parts(qweight, qzeros, scales)
        inner_k_tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)  # 16-, 8- or 4-byte loads of packed words
        if q.is_cuda:
            self.weight = torch.ops.aten._convert_weight_to_int4pack(nibble_pairs(q), inner_k_tiles)
        else:
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles)
        self.group_size, self.n = group_size, n

    @classmethod
    def supports(cls, n: int, k: int, group_size: int, device: torch.device) -> bool:
        return group_size in cls.GROUPS and k % group_size == 0 and n % (8 if device.type == "cuda" else 16) == 0

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
        """x [..., K] (gated: [..., 2K] = [gate | up], of which silu_and_mul is the input) -> [..., N] in x's dtype."""
        x2 = silu_and_mul(x) if gated else x
        x2 = x2.reshape(-1, x2.shape[-1]).to(torch.bfloat16).contiguous()
        mm = torch.ops.aten._weight_int4pack_mm if x2.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        out = mm(x2, self.weight, self.group_size, self.scale_and_zero).to(x.dtype)
        if bias is not None:
            out.add_(bias)  # one kernel whatever the bias's dtype (fp16 in AWQ checkpoints): a decode step's few us
        return out.reshape(*x.shape[:-1], self.n)


def awq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, bias: torch.Tensor | None = None, gated: bool = False,
               int4: Int4Pack | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) with W kept packed (GPU memory stays at 4 bits per weight; large prefills
    dequantize a transient copy, see awq_triton); gated: of silu_and_mul(x); `int4`: the weight in torch's int4
    layout, for the token counts the table gives that kernel."""
    if awq_gemm is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        return awq_gemm(x, qweight, qzeros, scales, group_size, bias=bias, gated=gated, int4=int4)
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
        self.int4: Int4Pack | None = None  # made by `prepare` once the weights are loaded

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

    def prepare(self) -> None:
        """Once the weights are loaded (before the KV cache takes the rest of the memory): on a GPU whose table gives
        torch's int4 kernel some token counts of this shape, the weight in its layout too (if it takes the shape)."""
        n, k, device = self.out_features, self.in_features, self.qweight.device
        self.int4 = None
        if (device.type == "cuda" and uses_int4mm is not None and uses_int4mm(device, n, k)
                and Int4Pack.supports(n, k, self.group_size, device)):
            self.int4 = Int4Pack(self.qweight, self.qzeros, self.scales, self.group_size)

    def forward(self, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        """x [..., in_features] (gated: [..., 2 * in_features], of which silu_and_mul is the input)."""
        if x.is_cuda:
            return awq_matmul(x, self.qweight, self.qzeros, self.scales, self.group_size, self.bias, gated, self.int4)
        # CPU (no fast kernel): dequantize once and keep the dense weight; memory matters less than speed here.
        return linear(x, self.dense_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype), gated)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, shards={self.shards}")


def prepare(model: nn.Module) -> None:
    """`AWQLinear.prepare` for every AWQ layer of a loaded model."""
    for module in model.modules():
        if isinstance(module, AWQLinear):
            module.prepare()
