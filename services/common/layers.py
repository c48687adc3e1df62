"""Layers both GPU services' model files share: RMSNorm, fused projections, attention."""
import functools

import torch
import torch.nn.functional as F
from torch import nn

try:  # flash-attn when importable (GPU, fp16/bf16); SDPA otherwise.
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


COMPILE_OPTIONS = {"dynamic": True, "fullgraph": True}


def on_gpu_compiled(fn):
    """`fn` compiled by inductor for CUDA inputs, run as written on the CPU.

    For chains of small elementwise ops (norms, residual adds, activations): compiled, each chain is one
    kernel, and even inside a CUDA graph every kernel costs a few µs however small. At InternLM2.5-7B shapes on an
    H200 this took a one-stream decode step from 6.73 to 5.25 ms (bench.decoder, 2026-11-30). TORCHDYNAMO_DISABLE=1
    runs them eagerly on the GPU too. Token counts are symbolic from the first compile (dynamic=True): one graph
    for the counts above 1 (two when the first count equals a width, which dynamo then ties to it), one for 1."""
    compiled = None  # made on the first CUDA call: torch.compile imports dynamo, seconds a CPU process never needs

    @functools.wraps(fn)
    def run(x: torch.Tensor, *args):
        nonlocal compiled
        if not x.is_cuda or torch.compiler.is_compiling():  # the CPU, or inside a model compiled whole (fused there)
            return fn(x, *args)
        if compiled is None:
            compiled = torch.compile(fn, **COMPILE_OPTIONS)
        return compiled(x, *args)
    return run


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, as the reference implementations do."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


rms_norm = on_gpu_compiled(_rms_norm)


@on_gpu_compiled
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): a block's residual add and the next norm in one kernel."""
    residual = x + residual
    return _rms_norm(residual, weight, eps), residual


@on_gpu_compiled
def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of x = [gate | up] (halves of the last dimension): a GLU MLP's activation."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as the reference implementations do; given a residual, added to it first (the
    sum is returned too, as the next residual)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


def shard_offsets(sizes: dict[object, int]) -> dict[object, tuple[int, int]]:
    """(first row, rows) of each shard of a fused projection, stacked in the order given."""
    offsets, start = {}, 0
    for shard, rows in sizes.items():
        offsets[shard] = (start, rows)
        start += rows
    return offsets


# MKL's sgemm copies ("packs") its second operand on every call: for x @ W^T with a few rows, that is the whole weight.
# As the first operand of W @ x^T the weight is read in place: 0.94-1.76x per projection for 8 to 48 rows on this
# project's x86 CPU (at least 1.1x for most shapes; a 16-stream decode step at 0.5B shapes: 244 -> 200-220 ms).
# Below 8 rows it is slower (2 rows: 0.33-0.48x); from ~56 rows the packing pays for itself.
CPU_TRANSPOSED_ROWS = (8, 48)  # first and last


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           gated: bool = False) -> torch.Tensor:
    """F.linear, of silu_and_mul(x) when `gated` (a GLU MLP's down projection); on the GPU one row through the tuned
    Triton GEMV where the kernel table has the shape (services.common.gemv; it gates x itself, so the activation is no
    kernel of its own); on the CPU, float32 as (W @ x^T)^T when x has rows within CPU_TRANSPOSED_ROWS."""
    rows = x.numel() // x.shape[-1]
    if x.is_cuda and rows == 1 and weight.stride(-1) == 1 and (config := _gemv_config(x.device, *weight.shape)):
        from services.common.gemv import gemv
        return gemv(x, weight, bias, config, gated)
    if gated:
        x = silu_and_mul(x)
    first, last = CPU_TRANSPOSED_ROWS
    if x.device.type != "cpu" or x.dtype != torch.float32 or not first <= rows <= last:
        return F.linear(x, weight, bias)
    xt = x.reshape(rows, x.shape[-1]).t()
    out = torch.mm(weight, xt) if bias is None else torch.addmm(bias.unsqueeze(1), weight, xt)
    return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])


def _gemv_config(device: torch.device, n: int, k: int):
    from services.common.gemv import config_for  # Triton: imported on the GPU only
    return config_for(device, n, k)


class Linear(nn.Linear):
    """nn.Linear through `linear` (`gated`: of silu_and_mul(x))."""

    def forward(self, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        return linear(x, self.weight, self.bias, gated)


class FusedLinear(Linear):
    """One matmul for several projections stored apart in checkpoints (q/k/v, gate/up).

    `sizes` maps each shard id to its number of output rows, in the order they are stacked.
    """

    def __init__(self, in_features: int, sizes: dict[object, int], bias: bool):
        super().__init__(in_features, sum(sizes.values()), bias=bias)
        self.offsets, self.shards = shard_offsets(sizes), tuple(sizes)

    def load_shard(self, param: nn.Parameter, tensor: torch.Tensor, shard: object) -> None:
        start, rows = self.offsets[shard]
        if tensor.shape[0] != rows or tensor.shape[1:] != param.shape[1:]:
            raise ValueError(f"shard {shard} of shape {tuple(tensor.shape)} does not fit rows {start}:{start + rows} "
                             f"of {tuple(param.shape)}")
        param[start:start + rows].copy_(tensor)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """q [b, s_q, h, d], k/v [b, s_k, h_kv, d] -> [b, s_q, h, d]. Causal means aligned to the end of k."""
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    s_q, s_k = q.shape[2], k.shape[2]
    mask, pad = None, 0
    if causal and 1 < s_q < s_k:  # aligned to the end of k: SDPA's own is_causal aligns to the start
        if 2 * s_q > s_k:
            # Most keys are new (a prompt after a short cached prefix): queries padded at the front to the keys'
            # length let SDPA's causal kernel skip the masked half; an explicit mask computes every score. On the
            # CPU at 0.5B shapes, 3,362 queries over 3,522 keys: 255 ms against 596 ms, the same output.
            pad = s_k - s_q
            q = F.pad(q, (0, 0, pad, 0))
        else:
            mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(diagonal=s_k - s_q)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and 1 < s_q and q.shape[2] == s_k,
                                         scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out[:, :, pad:].transpose(1, 2)
