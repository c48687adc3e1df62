"""What attention needs to know about a step's flattened batch, and the paged attention over the KV cache.

Kernels, in order of preference: flash-attn's varlen function with a block table (CUDA, when importable and the
block size is a multiple of 256, its page-size rule), the project's Triton kernel (CUDA), SDPA (CPU).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.common.layers import attention

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None
try:
    from services.llm_decoder.engine.triton_attention import paged_attention as triton_paged_attention
except ImportError:  # Triton comes with CUDA builds of torch
    triton_paged_attention = None


@dataclass
class BatchContext:
    """A step's new tokens from B sequences, flattened along one axis; tensors on the model's device.

    Sequence b's tokens are rows cu_seqlens_q[b]:cu_seqlens_q[b+1]; with them it has context_lens[b] keys, in the
    cache blocks block_tables[b]; slot_mapping gives each new token's cache slot (block * block_size + offset).
    """
    cu_seqlens_q: torch.Tensor   # int32 [B + 1]
    context_lens: torch.Tensor   # int32 [B]
    block_tables: torch.Tensor   # int32 [B, W]
    slot_mapping: torch.Tensor   # int64 [T]
    max_query_len: int
    max_context_len: int
    query_ranges: list[tuple[int, int]]  # host copies, for the CPU path and per-sequence rope
    decode_rows: tuple | None = None     # CPU: `cpu_decode_rows`, worked out once per step by the runner


def cpu_decode_rows(ctx: BatchContext, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The CPU path's decode rows: their token rows (None when the step is decodes only: row b is token b), the
    cache slots of their contexts [n * L] (padded to the longest) and the mask of real keys [n, L]; None without
    decodes."""
    decode = [b for b, (s, e) in enumerate(ctx.query_ranges) if e - s == 1]
    if not decode:
        return None
    only = len(decode) == len(ctx.query_ranges)  # a decode-only step: rows are tokens, nothing to pick
    rows = slice(None) if only else torch.tensor(decode)
    lens = ctx.context_lens[rows]
    width = -(-ctx.max_context_len // block_size)
    offsets = torch.arange(width * block_size)
    slots = ctx.block_tables[rows, :width].long().repeat_interleave(block_size, dim=1) * block_size \
        + offsets % block_size
    return None if only else ctx.cu_seqlens_q[rows].long(), slots.flatten(), offsets < lens[:, None]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    ctx: BatchContext, scale: float) -> torch.Tensor:
    """q [T, H, d], k/v [T, H_kv, d] of the new tokens, already written to the caches [blocks, block_size, H_kv, d]
    at ctx.slot_mapping -> [T, H, d]."""
    if q.is_cuda:
        if flash_attn_varlen_func is not None and q.dtype != torch.float32 and k_cache.shape[1] % 256 == 0:
            cu_seqlens_k = F.pad(ctx.context_lens.cumsum(0, dtype=torch.int32), (1, 0))
            return flash_attn_varlen_func(q, k_cache, v_cache, ctx.cu_seqlens_q, cu_seqlens_k, ctx.max_query_len,
                                          ctx.max_context_len, softmax_scale=scale, causal=True,
                                          block_table=ctx.block_tables)
        return triton_paged_attention(q, k_cache, v_cache, ctx.cu_seqlens_q, ctx.context_lens, ctx.block_tables,
                                      scale, ctx.max_query_len)
    return sdpa_paged_attention(q, k, v, k_cache, v_cache, ctx, scale)


def sdpa_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, ctx: BatchContext, scale: float) -> torch.Tensor:
    """The CPU path: one batched SDPA call over every decode row (contexts gathered and padded), one call per
    prefill chunk (over the new keys themselves when the chunk is the whole context)."""
    out = torch.empty_like(q)
    if decode := ctx.decode_rows or cpu_decode_rows(ctx, k_cache.shape[1]):
        tokens, slots, mask = decode
        # [n, H_kv, L, d] from the flat cache: one index_select per tensor, not a gather over block-table rows.
        keys, values = (c.view(-1, *c.shape[2:]).index_select(0, slots).view(*mask.shape, *c.shape[2:])
                        .transpose(1, 2) for c in (k_cache, v_cache))
        o = F.scaled_dot_product_attention((q if tokens is None else q[tokens])[:, :, None], keys, values,
                                           attn_mask=mask[:, None, None], scale=scale,
                                           enable_gqa=keys.shape[1] != q.shape[1])[:, :, 0]
        if tokens is None:
            return o
        out[tokens] = o
    for b, (s, e) in enumerate(ctx.query_ranges):
        if e - s > 1:
            n = int(ctx.context_lens[b])
            if n == e - s:  # nothing cached before this chunk: its keys are the new ones, no gather
                keys, values = k[None, s:e], v[None, s:e]
            else:
                table = ctx.block_tables[b, :-(-n // k_cache.shape[1])]
                keys, values = (c[table].flatten(0, 1)[None, :n] for c in (k_cache, v_cache))
            out[s:e] = attention(q[None, s:e], keys, values, scale, causal=True)[0]
    return out
