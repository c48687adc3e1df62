"""Triton paged attention for one mixed varlen batch: decode rows (1 new token) and prefill chunks over a cached prefix.

Sequence b's new tokens are q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]; its context_lens[b] keys (new tokens included, already
written) live in the cache blocks block_tables[b]. Causal attention aligned to the end of the context, fp32 online
softmax. A program owns one KV head and a tile of BLOCK_Q query tokens x the GROUP query heads sharing that KV head, so
each K/V tile is read once per KV head and decode gets its 16-row tl.dot from the head group. Long decode at small batch
splits the keys over programs (flash-decoding); the last split of a tile to finish merges the partial softmaxes (no
second kernel: at one stream that was one more launch per layer).
"""
import torch
import triton
import triton.language as tl

from services.common.cuda_graphs import arrival_counters
from services.common.kernel_tables import TRITON_OPTIONS


# The number of sequences and the block tables' row stride (the step's widest table) change from step to step:
# specialized (Triton's default for integers: == 1, divisible by 16), each new value class would compile the kernel
# again on first use, a stall of the whole batch in the middle of serving.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _attn(q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, m_ptr, l_ptr, count_ptr, cu_q_ptr, ctx_ptr, bt_ptr, qk_scale,
          num_seqs, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
          stride_ot, stride_oh, GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
          SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    pid, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # Sequence b owns q-blocks cu_q[b] // BLOCK_Q + b onwards (at least cdiv(qlen, BLOCK_Q) of them, T // BLOCK_Q + B
    # in all), so the grid needs only host shapes; a binary search finds the sequence of this program.
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_q_ptr + mid) // BLOCK_Q + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    b = lo - 1
    q_start, q_end = tl.load(cu_q_ptr + b), tl.load(cu_q_ptr + b + 1)
    qlen, ctx = q_end - q_start, tl.load(ctx_ptr + b)
    q0 = (pid - q_start // BLOCK_Q - b) * BLOCK_Q  # first query token of this tile, relative to the sequence
    if q0 >= qlen:
        return

    # Row r of the tile is query token q0 + r // GROUP under query head kvh * GROUP + r % GROUP.
    offs_m, offs_n, offs_d = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, HEAD_PAD)
    tok = q0 + offs_m // GROUP
    head = kvh * GROUP + offs_m % GROUP
    row_ok = (offs_m < BLOCK_Q * GROUP) & (tok < qlen)
    d_ok = offs_d < HEAD_DIM
    pos = ctx - qlen + tok  # absolute position of each row's token: it sees keys 0..pos
    q = tl.load(q_ptr + (q_start + tok)[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Keys this tile can see, cut into BLOCK_N tiles and dealt out to the splits.
    kv_end = tl.maximum(ctx - qlen + tl.minimum(q0 + BLOCK_Q, qlen), 0)
    per_split = tl.cdiv(tl.cdiv(kv_end, BLOCK_N), SPLITS)
    n_lo = split * per_split * BLOCK_N
    n_hi = tl.minimum(n_lo + per_split * BLOCK_N, kv_end)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_PAD), tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        keys = n0 + offs_n
        k_ok = keys < n_hi
        # Per-key block lookup: a tile may span several pages, so any page size works.
        blk = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + keys // PAGE, mask=k_ok, other=0).to(tl.int64)
        slot = keys % PAGE
        kv_mask = k_ok[None, :] & d_ok[:, None]
        k = tl.load(k_ptr + (blk * stride_kb + slot * stride_ks + kvh * stride_kh)[None, :] + offs_d[:, None],
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # log2 domain: qk_scale folds in log2(e)
        s = tl.where((keys[None, :] <= pos[:, None]) & k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet: avoid -inf - -inf
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + (blk * stride_vb + slot * stride_vs + kvh * stride_vh)[:, None] + offs_d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    row = (q_start + tok).to(tl.int64)
    o_ptrs = out_ptr + row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    o_mask = row_ok[:, None] & d_ok[None, :]
    if SPLITS == 1:
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # context_len 0 (padding) gives zeros, not NaN
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        # The unnormalised partial, its running max and sum go to part[row, head, split] and m/l; the last of the
        # tile's splits to arrive merges them in split order (deterministic), then resets the tile's counter.
        ml = (row * tl.num_programs(1) * GROUP + head) * SPLITS  # split 0 of each row
        p_ptrs = part_ptr + (ml[:, None] + split) * HEAD_DIM + offs_d[None, :]
        tl.store(p_ptrs, acc, mask=o_mask)
        tl.store(m_ptr + ml + split, m_i, mask=row_ok)
        tl.store(l_ptr + ml + split, l_i, mask=row_ok)
        tl.debug_barrier()  # every thread's partial is written before this program's arrival is counted
        tile = pid * tl.num_programs(1) + kvh
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == SPLITS - 1:  # release ours, acquire the others'
            # Unrolled (static_range): each split's loads issue together instead of one L2 round trip per split
            # in turn, 2 x 16 of them at one stream where the whole kernel takes ~13 us on an H200.
            m_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            for j in tl.static_range(SPLITS):
                m_max = tl.maximum(m_max, tl.load(m_ptr + ml + j, mask=row_ok, other=float("-inf"),
                                                  cache_modifier=".cg"))
            m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)  # empty splits (m = -inf) weigh 0
            l_sum = tl.zeros((BLOCK_M,), tl.float32)
            acc = tl.zeros((BLOCK_M, HEAD_PAD), tl.float32)
            for j in tl.static_range(SPLITS):
                w = tl.exp2(tl.load(m_ptr + ml + j, mask=row_ok, other=float("-inf"), cache_modifier=".cg") - m_safe)
                l_sum += w * tl.load(l_ptr + ml + j, mask=row_ok, other=0.0, cache_modifier=".cg")
                acc += w[:, None] * tl.load(part_ptr + (ml[:, None] + j) * HEAD_DIM + offs_d[None, :], mask=o_mask,
                                            other=0.0, cache_modifier=".cg")
            acc = acc / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
            tl.atomic_xchg(count_ptr + tile, 0)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, max_query_len: int,
                    *, num_splits: int | None = None) -> torch.Tensor:
    """q [T, H, d]; caches [num_blocks, block_size, H_kv, d]; cu_seqlens_q [B+1], context_lens [B], block_tables
    [B, max_blocks] int32 -> [T, H, d] in q's dtype. No host sync: the launch depends on shapes and max_query_len only.
    num_splits (a power of two) overrides the flash-decoding split heuristic, used for pure decode batches only."""
    T, H, d = q.shape
    _, page, h_kv, _ = k_cache.shape
    B = block_tables.shape[0]
    if H % h_kv or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("need H % H_kv == 0 and caches contiguous in head_dim")
    q = q if q.stride(-1) == 1 else q.contiguous()
    group = H // h_kv
    # Decode tiles are the head group padded to the 16 rows tl.dot needs; prefill adds query tokens up to 64 rows.
    block_m = max(16 if max_query_len == 1 else 64, triton.next_power_of_2(group))
    block_q = block_m // group
    if num_splits is None:
        splits = 1
        if max_query_len == 1:  # too few (sequence, KV head) programs to fill the GPU: split the keys instead
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
            splits = min(16, triton.next_power_of_2(triton.cdiv(2 * sms, B * h_kv)))
    else:
        splits = num_splits
        if splits < 1 or splits & (splits - 1):
            raise ValueError(f"num_splits must be a power of two, got {splits}")
    out = torch.empty_like(q)
    grid = (T // block_q + B, h_kv, splits)
    part = m = l_s = counters = None  # one split writes the output directly
    if splits > 1:
        part = torch.empty(T, H, splits, d, device=q.device, dtype=torch.float32)
        m = torch.empty(T, H, splits, device=q.device, dtype=torch.float32)
        l_s = torch.empty_like(m)
        counters = arrival_counters(q.device, grid[0] * grid[1])
    _attn[grid](q, k_cache, v_cache, out, part, m, l_s, counters, cu_seqlens_q, context_lens, block_tables,
                scale * 1.4426950408889634, B, q.stride(0), q.stride(1), *k_cache.stride()[:3],
                *v_cache.stride()[:3], block_tables.stride(0), out.stride(0), out.stride(1), GROUP=group,
                BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=64, PAGE=page, HEAD_DIM=d,
                HEAD_PAD=triton.next_power_of_2(d), SPLITS=splits,
                PRECISION="ieee" if q.dtype == torch.float32 else None, num_warps=4, num_stages=2,
                **TRITON_OPTIONS)
    return out
