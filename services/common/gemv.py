"""One token's projection on the GPU as a Triton GEMV: y = W x (+ b), W [N, K] read once, row-major, in wide loads.

A decode step of one stream is a chain of GEMVs bound by the weights' bytes; cuBLAS reached ~78 % of an H200's HBM
bandwidth on them (bench.decoder --profile, 2026-11-30). Each program owns BLOCK_N output rows and walks K in
BLOCK_K steps with loads STAGES - 1 steps ahead, keeping [BLOCK_N, BLOCK_K] fp32 products and summing them once at
the end (fp32 accumulation, one rounding to x's dtype, as cuBLAS does).

Which (N, K) take it, and with what tiles, is the committed table gemv_configs.json, written by
`python -m bench.gemv --tune` on the GPU (a shape goes there only when the kernel beat cuBLAS in that run); any other
shape and device stays on cuBLAS. GEMV_CONFIGS names another table file instead (one a tuning run just wrote).
"""
import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from services.common.kernel_tables import TRITON_OPTIONS, device_class, device_name, table_file

CONFIGS = Path(__file__).with_name("gemv_configs.json")


@triton.jit
def load_input(ptrs, mask, up_offset, GATED: tl.constexpr):
    """A projection's input at `ptrs`, read by every program (kept in L2). GATED: the values are a GLU MLP's
    [gate | up], up `up_offset` elements further, and the input is silu(gate) * up, rounded once to their dtype as
    the compiled layers.silu_and_mul rounds: the activation needs no kernel of its own. (mask None: all in bounds.)"""
    other = None if mask is None else 0.0
    x = tl.load(ptrs, mask=mask, other=other, eviction_policy="evict_last")
    if GATED:
        gate = x.to(tl.float32)
        up = tl.load(ptrs + up_offset, mask=mask, other=other, eviction_policy="evict_last").to(tl.float32)
        x = (gate * tl.sigmoid(gate) * up).to(x.dtype)
    return x


@triton.jit
def _gemv(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_wn, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = load_input(x_ptr + offs_k, k_ok, K, GATED)  # gated: x_ptr holds [gate | up] of 2K
        w = tl.load(rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                    eviction_policy="evict_first")  # each weight is read once
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_ok)


@dataclass(frozen=True)
class Config:
    block_n: int = 16
    block_k: int = 256
    warps: int = 4
    stages: int = 4

    def __str__(self) -> str:
        return f"{self.block_n}x{self.block_k} w{self.warps} s{self.stages}"


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: Config,
         gated: bool = False) -> torch.Tensor:
    """x [..., K] holding one row, weight [N, K] (last dim contiguous) -> [..., N] in x's dtype; gated: x is
    [..., 2K] = [gate | up] and the product is of silu(gate) * up (layers.silu_and_mul)."""
    n, k = weight.shape
    xv = x.reshape(2 * k if gated else k)
    if xv.stride(0) != 1:
        xv = xv.contiguous()
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    _gemv[(triton.cdiv(n, config.block_n),)](xv, weight, bias, out, n, k, weight.stride(0), HAS_BIAS=bias is not None,
                                             GATED=gated, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                                             STAGES=config.stages, num_warps=config.warps, **TRITON_OPTIONS)
    return out.view(*x.shape[:-1], n)


def parse_table(raw: dict) -> dict[str, dict[tuple[int, int], Config]]:
    """{device class: {(N, K): Config}} from the JSON table."""
    return {cls: {(s["n"], s["k"]): Config(**{f: s[f] for f in asdict(Config())}) for s in entry["shapes"]}
            for cls, entry in raw.items()}


@functools.cache
def _table() -> dict:
    return parse_table(json.loads(table_file(CONFIGS, "GEMV_CONFIGS").read_text()))


@functools.cache
def config_for(device: torch.device, n: int, k: int) -> Config | None:
    """The tuned config of (N, K) on this device's class; None: cuBLAS. Memoized: asked for every projection of
    every one-stream step."""
    return _table().get(device_class(device_name(device)), {}).get((n, k))
