"""W4A16 GEMM over AWQ-packed weights in Triton: nibbles are unpacked in registers, so weights stream at 4 bits.

out[M, N] = x[M, K] @ W^T with W[n, k] = (q[k, n] - zero[k // group, n]) * scale[k // group, n], products accumulated
in fp32. The fused kernels for decoding compute with the exact weights: a GEMV multiplies x by (q - z) * scale in
fp32, a tl.dot tile of fewer than 64 rows multiplies x by q - z (small integers, exact in x's dtype) and applies the
group's scales to the fp32 sums; so no weight is rounded to x's dtype nor converted from fp32 to it (12-24 % fewer
sm_90 instructions per loop iteration than rounding each weight, the configs of the table in fp16 and bf16). Prefill
tiles (64 rows or more) multiply by the weights rounded to x's dtype, as the dense path does (`awq.dequantize`'s
rounding in fp16; the scale rounded to bf16 first in bf16), which lets the tensor cores do the summing: scaling an
fp32 accumulator per group cost more instructions a step than the wgmma took cycles.

`awq_gemm` picks one of four paths per (device, N, K, M) from the committed table awq_configs.json (written by
`python -m bench.awq --tune` on the GPU; no autotuning at serving time; the environment variable AWQ_CONFIGS names
another table file to use instead, e.g. one a tuning run just wrote):
  - fused, BLOCK_M == 1: a GEMV for one token; fp32 products are summed over K once, at the end of the program
    (nibbles spread over their columns by interleaving, unpacked "slots" first, or "in-place" where they lie in
    their word with a program per group: which is faster is the table's);
  - fused, BLOCK_M >= 16: tl.dot on BLOCK_M x BLOCK_N tiles (decode batches and prefill), the nibbles spread over
    their columns by interleaving, or (16-row tiles) unpacked two at a time in 16-bit "lanes", a tl.dot per slot;
    prefill tiles unpack in lanes too and join the slots in column order before one tl.dot;
  - dense: the weight dequantized to x's dtype by a Triton kernel, then torch's matmul (large prefills);
  - int4mm: torch's own W4A16 kernel on the layer's `awq.Int4Pack` (bf16 tensor-core tiles of 16 tokens).
The fused kernel splits K over `split` programs per output tile when the tiles alone would leave SMs idle (skinny
decode shapes); the last program to finish a tile sums the fp32 partials, so a call is one launch. A gated call (a GLU
MLP's down projection) passes [gate | up], and the fused kernels compute silu(gate) * up as they load it.
"""
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from services.common import kernel_tables
from services.common.cuda_graphs import arrival_counters
from services.common.gemv import load_input
from services.common.kernel_tables import TRITON_OPTIONS, device_class
from services.common.layers import silu_and_mul

CONFIGS = Path(__file__).with_name("awq_configs.json")  # the committed table


@triton.jit
def _nibbles(words, shifts, dtype: tl.constexpr, nibble_mask):
    """The nibbles at bit offsets `shifts` of `words`, in `dtype` (fp32, fp16 or bf16), each plus a power of two: a
    nibble v or-ed into the bits of 2^23 (fp32), 1024 (fp16) or 128 (bf16) reads as that number + v, an
    integer-to-float conversion (a quarter-rate instruction) for the price of a bitwise or. Differences of two are
    exact. (The mask drops the sign bits an arithmetic shift brings in.)

    nibble_mask is 0xF given at run time, for fp32: with a constant, LLVM makes shift-and-mask a bit-field extract,
    which ptxas lowers to a shift and a zero-extension before the or (three instructions a nibble); with the mask in
    a register the and-or is one LOP3 (one-token tiles' loops 4-12 % shorter on sm_90, `bench.sass`). The 16-bit
    path keeps the constant: its tl.dot tiles unpack two nibbles an instruction with it (17 % longer without)."""
    if dtype == tl.float32:  # static: one return type per compiled kernel
        out = (((words >> shifts) & nibble_mask) | 0x4B000000).to(tl.float32, bitcast=True)
    else:
        v = (words >> shifts) & 0xF
        out = (v | (0x6400 if dtype == tl.float16 else 0x4300)).to(tl.int16).to(dtype, bitcast=True)
    return out


@triton.jit
def _packed(qw_ptr, qz_ptr, k0, offs_w, N, group_size, BLOCK_K: tl.constexpr):
    """The packed words of W^T rows k0..k0+BLOCK_K, columns of words offs_w ([BLOCK_K, words], 0 past N), their
    group's packed zeros ([words]) and that group's index (the rows lie in one group)."""
    w_ok = offs_w < N // 8
    offs_k = k0 + tl.arange(0, BLOCK_K)
    words = tl.load(qw_ptr + offs_k[:, None] * (N // 8) + offs_w[None, :], mask=w_ok[None, :], other=0)
    g = k0 // group_size
    zeros = tl.load(qz_ptr + g * (N // 8) + offs_w, mask=w_ok, other=0)
    return words, zeros, g


@triton.jit
def _tile(qw_ptr, qz_ptr, sc_ptr, k0, offs_w, offs_n, N, group_size, nibble_mask, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, dtype: tl.constexpr):
    """q - z of W^T rows k0..k0+BLOCK_K, columns offs_n: [BLOCK_K, BLOCK_N] small integers, exact in `dtype`; and the
    [BLOCK_N] scales of their group in fp32 (the rows lie in one)."""
    words, zeros, g = _packed(qw_ptr, qz_ptr, k0, offs_w, N, group_size, BLOCK_K)
    scales = tl.load(sc_ptr + g * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    # Each packed word is read once and repeated 8 times in registers; channel j of a word sits in nibble slot
    # j // 2 + 4 * (j % 2) (AWQ's order 0, 2, 4, 6, 1, 3, 5, 7).
    for _ in tl.static_range(3):
        words = tl.interleave(words, words)
        zeros = tl.interleave(zeros, zeros)
    j = tl.arange(0, BLOCK_N) % 8
    shifts = (j // 2 + (j % 2) * 4) * 4
    return (_nibbles(words, shifts[None, :], dtype, nibble_mask)
            - _nibbles(zeros, shifts, dtype, nibble_mask)[None, :]), scales


@triton.jit
def _gemv_by_slot(x_ptr, qw_ptr, qz_ptr, sc_ptr, offs_w, N, K, group_size, kb_lo, kb_hi, nibble_mask,
                  GATED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """One token's sums over K blocks kb_lo..kb_hi for the columns of words offs_w, unpacked nibble slot by nibble
    slot: the words [BLOCK_K, BLOCK_N // 8] broadcast to [BLOCK_K, 8, BLOCK_N // 8] and shifted per slot, where the
    interleaved tile repeats each word 8 times along the columns first. Returns the [BLOCK_N] sums and their columns,
    slot-major (so not in column order)."""
    slot = tl.arange(0, 8)
    shifts = slot * 4
    cols = 8 * offs_w[None, :] + (2 * (slot % 4) + slot // 4)[:, None]  # [8, words]: AWQ's order 0, 2, 4, 6, 1, ...
    w_ok = offs_w < N // 8
    acc = tl.zeros((BLOCK_K, 8, BLOCK_N // 8), dtype=tl.float32)
    for kb in tl.range(kb_lo, kb_hi, num_stages=STAGES):
        k0 = kb * BLOCK_K
        x = load_input(x_ptr + k0 + tl.arange(0, BLOCK_K), None, K, GATED)
        words, zeros, g = _packed(qw_ptr, qz_ptr, k0, offs_w, N, group_size, BLOCK_K)
        scales = tl.load(sc_ptr + g * N + cols, mask=w_ok[None, :], other=0.0).to(tl.float32)
        # Exact weights, as the interleaved GEMV's.
        q = _nibbles(words[:, None, :], shifts[None, :, None], tl.float32, nibble_mask)
        z = _nibbles(zeros[None, :], shifts[:, None], tl.float32, nibble_mask)
        acc += x.to(tl.float32)[:, None, None] * ((q - z[None, :, :]) * scales[None, :, :])
    return tl.reshape(tl.sum(acc, 0), (BLOCK_N,)), tl.reshape(cols, (BLOCK_N,))


@triton.jit
def _at_place(src, SHIFT: tl.constexpr):
    """The nibble at bits SHIFT..SHIFT+3 of `src`, left where it lies and or-ed into 2^23's bits: 2^23 + 2^SHIFT *
    nibble in fp32, one LOP3 (no shift: the factor 2^SHIFT goes into the column's scale, exactly)."""
    return ((src & (0xF << SHIFT)) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _slot_sum(x, src, zsrc, acc, SHIFT: tl.constexpr):
    # (2^23 + 2^SHIFT q) - (2^23 + 2^SHIFT z) = 2^SHIFT (q - z), exact: one FADD and one FFMA a weight.
    return acc + x * (_at_place(src, SHIFT) - _at_place(zsrc, SHIFT)[None, :])


@triton.jit
def _scaled(y, sc_ptr, cols, w_ok, SHIFT: tl.constexpr):
    return y * (tl.load(sc_ptr + cols, mask=w_ok, other=0.0).to(tl.float32) * (1.0 / (1 << SHIFT)))


@triton.jit
def _gemv_in_place(x_ptr, qw_ptr, qz_ptr, sc_ptr, offs_w, N, K, group_size, kb_lo, GATED: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """One token's sums over the group that starts at K block kb_lo (a program per group), for the columns of words
    offs_w, with each nibble unpacked where it lies in its word (_at_place): three instructions a weight (LOP3,
    FADD, FFMA; the interleaved GEMV's loop takes about seven), one accumulator per nibble slot, and the group's scale
    applied once per column after the sum over K instead of once per weight. Returns the [BLOCK_N] sums and their
    columns, in the joins' order (so not in column order)."""
    BLOCK_W: tl.constexpr = BLOCK_N // 8
    w_ok = offs_w < N // 8
    k0 = kb_lo * BLOCK_K
    g = k0 // group_size
    z_lo = tl.load(qz_ptr + g * (N // 8) + offs_w, mask=w_ok, other=0)
    z_hi = z_lo >> 16  # slots 4-7 in bits 0-15 (the mask drops the sign bits the shift brings in)
    a0 = tl.zeros((BLOCK_K, BLOCK_W), tl.float32)
    a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w_ptrs = qw_ptr + offs_k[:, None] * (N // 8) + offs_w[None, :]
    x_ptrs = x_ptr + offs_k
    for _ in tl.range(0, group_size, BLOCK_K, num_stages=STAGES):
        x = load_input(x_ptrs, None, K, GATED).to(tl.float32)[:, None]
        lo = tl.load(w_ptrs, mask=w_ok[None, :], other=0)
        hi = lo >> 16
        a0 = _slot_sum(x, lo, z_lo, a0, 0)
        a1 = _slot_sum(x, lo, z_lo, a1, 4)
        a2 = _slot_sum(x, lo, z_lo, a2, 8)
        a3 = _slot_sum(x, lo, z_lo, a3, 12)
        a4 = _slot_sum(x, hi, z_hi, a4, 0)
        a5 = _slot_sum(x, hi, z_hi, a5, 4)
        a6 = _slot_sum(x, hi, z_hi, a6, 8)
        a7 = _slot_sum(x, hi, z_hi, a7, 12)
        w_ptrs += BLOCK_K * (N // 8)
        x_ptrs += BLOCK_K
    # Slot p holds channel 2 (p % 4) + p // 4 of its word (AWQ's order 0, 2, 4, 6, 1, 3, 5, 7).
    col = 8 * offs_w
    sc = sc_ptr + g * N + col
    y0 = tl.join(_scaled(tl.sum(a0, 0), sc, 0, w_ok, 0), _scaled(tl.sum(a4, 0), sc, 1, w_ok, 0))
    y1 = tl.join(_scaled(tl.sum(a1, 0), sc, 2, w_ok, 4), _scaled(tl.sum(a5, 0), sc, 3, w_ok, 4))
    y2 = tl.join(_scaled(tl.sum(a2, 0), sc, 4, w_ok, 8), _scaled(tl.sum(a6, 0), sc, 5, w_ok, 8))
    y3 = tl.join(_scaled(tl.sum(a3, 0), sc, 6, w_ok, 12), _scaled(tl.sum(a7, 0), sc, 7, w_ok, 12))
    c0, c1 = tl.join(col, col + 1), tl.join(col + 2, col + 3)
    c2, c3 = tl.join(col + 4, col + 5), tl.join(col + 6, col + 7)
    y = tl.join(tl.join(y0, y1), tl.join(y2, y3))
    cols = tl.join(tl.join(c0, c1), tl.join(c2, c3))
    return tl.reshape(y, (BLOCK_N,)), tl.reshape(cols, (BLOCK_N,))


@triton.jit
def _lanes(words, SHIFT: tl.constexpr, dtype: tl.constexpr):
    """Nibble slots SHIFT // 4 and SHIFT // 4 + 4 of `words`, unpacked two at a time: each lands in the low bits of a
    16-bit lane or-ed into 1024 (fp16) or 128 (bf16), so one shift and one LOP3 give two weights (+ that power of
    two) in `dtype`, and the lanes are read as two halves."""
    v = ((words >> SHIFT) & 0x000F000F) | (0x64006400 if dtype == tl.float16 else 0x43004300)
    return v.to(tl.int16).to(dtype, bitcast=True), (v >> 16).to(tl.int16).to(dtype, bitcast=True)


# Tiles of this many rows or more multiply x by the weights rounded to its dtype (_rounded_tile).
ROUNDED_ROWS = tl.constexpr(64)


@triton.jit
def _rounded_tile(qw_ptr, qz_ptr, sc_ptr, k0, offs_w, offs_n, N, group_size, BLOCK_K: tl.constexpr,
                  dtype: tl.constexpr):
    """W^T rows k0..k0+BLOCK_K, columns offs_n, in `dtype`: (q - z) * scale with one rounding, as the dense path
    rounds in fp16 (in bf16 the scale is rounded to bf16 first). For prefill tiles: unpacked two nibbles an
    instruction (_lanes), the slots joined in column order, scaled before the dot, which then sums in the tensor
    cores; the scaling of an fp32 accumulator per K step (a multiply-add per output element) and the repeating of
    each word 8 times (_tile) cost more instructions than a 128-row tile's wgmma take cycles on sm_90
    (bench/results/sass-awq-2026-12-01-prefill.md)."""
    words, zeros, g = _packed(qw_ptr, qz_ptr, k0, offs_w, N, group_size, BLOCK_K)
    # Shift 4i gives slots i and i + 4 of every word: AWQ's channels 2i and 2i + 1 (order 0, 2, 4, 6, 1, 3, 5, 7);
    # q - z is exact (both carry the same power of two).
    q0, q1 = _lanes(words, 0, dtype)
    q2, q3 = _lanes(words, 4, dtype)
    q4, q5 = _lanes(words, 8, dtype)
    q6, q7 = _lanes(words, 12, dtype)
    z0, z1 = _lanes(zeros, 0, dtype)
    z2, z3 = _lanes(zeros, 4, dtype)
    z4, z5 = _lanes(zeros, 8, dtype)
    z6, z7 = _lanes(zeros, 12, dtype)
    # A join's new dimension is the last: [.., word, c // 4, c // 2 % 2, c % 2], column 8 word + c.
    qz = tl.join(tl.join(tl.join(q0 - z0[None, :], q4 - z4[None, :]), tl.join(q2 - z2[None, :], q6 - z6[None, :])),
                 tl.join(tl.join(q1 - z1[None, :], q5 - z5[None, :]), tl.join(q3 - z3[None, :], q7 - z7[None, :])))
    qz = tl.reshape(qz, (BLOCK_K, offs_n.shape[0]))
    scales = tl.load(sc_ptr + g * N + offs_n, mask=offs_n < N, other=0.0).to(dtype)
    return qz * scales[None, :]


@triton.jit
def _lane_dots(x, words, zeros, sc, w_ok, acc_lo, acc_hi, SHIFT: tl.constexpr):
    """acc_lo, acc_hi plus x times q - z of slots SHIFT // 4 and SHIFT // 4 + 4 (channels SHIFT // 2 and
    SHIFT // 2 + 1 of each word), the group's scales applied to the fp32 sums."""
    lo, hi = _lanes(words, SHIFT, x.dtype)
    z_lo, z_hi = _lanes(zeros, SHIFT, x.dtype)
    ch = SHIFT // 2
    s_lo = tl.load(sc + ch, mask=w_ok, other=0.0).to(tl.float32)
    s_hi = tl.load(sc + ch + 1, mask=w_ok, other=0.0).to(tl.float32)
    acc_lo += tl.dot(x, lo - z_lo[None, :]) * s_lo[None, :]
    acc_hi += tl.dot(x, hi - z_hi[None, :]) * s_hi[None, :]
    return acc_lo, acc_hi


@triton.jit
def _gemm_lanes(x_ptr, qw_ptr, qz_ptr, sc_ptr, offs_m, m_ok, offs_w, N, K, group_size, stride_xm, kb_lo, kb_hi,
                GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                STAGES: tl.constexpr):
    """Tiles of several tokens with the weights unpacked in 16-bit lanes (_lanes): a tl.dot per nibble slot, x times
    [BLOCK_K, BLOCK_N // 8] small integers, so the packed words need no repeating or reordering; the slots' sums are
    joined in column order at the end. Returns the [BLOCK_M, BLOCK_N] sums."""
    BLOCK_W: tl.constexpr = BLOCK_N // 8
    w_ok = offs_w < N // 8
    a0 = tl.zeros((BLOCK_M, BLOCK_W), tl.float32)
    a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
    for kb in tl.range(kb_lo, kb_hi, num_stages=STAGES):
        k0 = kb * BLOCK_K
        x = load_input(x_ptr + offs_m[:, None] * stride_xm + k0 + tl.arange(0, BLOCK_K)[None, :], m_ok[:, None], K,
                       GATED)
        words, zeros, g = _packed(qw_ptr, qz_ptr, k0, offs_w, N, group_size, BLOCK_K)
        sc = sc_ptr + g * N + 8 * offs_w
        a0, a1 = _lane_dots(x, words, zeros, sc, w_ok, a0, a1, 0)  # channel c of a word in accumulator c
        a2, a3 = _lane_dots(x, words, zeros, sc, w_ok, a2, a3, 4)
        a4, a5 = _lane_dots(x, words, zeros, sc, w_ok, a4, a5, 8)
        a6, a7 = _lane_dots(x, words, zeros, sc, w_ok, a6, a7, 12)
    # A join's new dimension is the last: the first join's pairs vary slowest, so [.., word, c // 4, c // 2 % 2,
    # c % 2] and column 8 word + c.
    y = tl.join(tl.join(tl.join(a0, a4), tl.join(a2, a6)), tl.join(tl.join(a1, a5), tl.join(a3, a7)))
    return tl.reshape(y, (BLOCK_M, BLOCK_N))


# M varies per step and split_k per shape: one compiled kernel per tile config, not per token count or split (the
# tuner tries many splits of each tile); nibble_mask must stay a run-time value (see _nibbles).
@triton.jit(do_not_specialize=["M", "split_k", "nibble_mask"])
def _awq_gemm(x_ptr, qw_ptr, qz_ptr, sc_ptr, b_ptr, out_ptr, ws_ptr, count_ptr, M, N, K, group_size, stride_xm,
              stride_om, split_k, nibble_mask, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, STAGES: tl.constexpr, SLOTS: tl.constexpr, IN_PLACE: tl.constexpr,
              LANES: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    m_ok = offs_m < M
    # This program's share of the K blocks, as even as can be (BLOCK_K divides the group: K is whole blocks).
    k_blocks = K // BLOCK_K
    kb_lo = pid_k * k_blocks // split_k
    kb_hi = (pid_k + 1) * k_blocks // split_k
    if IN_PLACE:  # one token, a program per group (split_k = K // group_size): columns come back permuted too
        y, offs_n = _gemv_in_place(x_ptr + pid_m * stride_xm, qw_ptr, qz_ptr, sc_ptr, offs_w, N, K, group_size, kb_lo,
                                   GATED, BLOCK_N, BLOCK_K, STAGES)
        acc = tl.reshape(y, (1, BLOCK_N))
    elif SLOTS:  # one token, unpacked slot by slot: the tile's columns come back in slot order, and are stored so
        y, offs_n = _gemv_by_slot(x_ptr + pid_m * stride_xm, qw_ptr, qz_ptr, sc_ptr, offs_w, N, K, group_size,
                                  kb_lo, kb_hi, nibble_mask, GATED, BLOCK_N, BLOCK_K, STAGES)
        acc = tl.reshape(y, (1, BLOCK_N))
    elif LANES:
        acc = _gemm_lanes(x_ptr, qw_ptr, qz_ptr, sc_ptr, offs_m, m_ok, offs_w, N, K, group_size, stride_xm, kb_lo,
                          kb_hi, GATED, BLOCK_M, BLOCK_N, BLOCK_K, STAGES)
    else:
        # GEMV keeps a [BLOCK_K, BLOCK_N] fp32 accumulator and reduces over K once, after the loop.
        acc = tl.zeros((BLOCK_K if BLOCK_M == 1 else BLOCK_M, BLOCK_N), dtype=tl.float32)
        # Loads run STAGES - 1 blocks ahead (Triton pipelines only loops with a dot unless the loop asks, as here).
        for kb in tl.range(kb_lo, kb_hi, num_stages=STAGES):
            k0 = kb * BLOCK_K
            x = load_input(x_ptr + offs_m[:, None] * stride_xm + k0 + tl.arange(0, BLOCK_K)[None, :], m_ok[:, None],
                           K, GATED)  # gated: rows of [gate | up], 2K long
            if BLOCK_M >= ROUNDED_ROWS:  # x times the weights rounded to its dtype, summed in the tensor cores
                acc = tl.dot(x, _rounded_tile(qw_ptr, qz_ptr, sc_ptr, k0, offs_w, offs_n, N, group_size, BLOCK_K,
                                              x.dtype), acc)
            else:
                # One token: x times the exact weights (q - z) * scale, in fp32. Tiles: x times q - z (exact in x's
                # dtype) on the tensor cores, the group's scales applied to the fp32 sums.
                qz, scales = _tile(qw_ptr, qz_ptr, sc_ptr, k0, offs_w, offs_n, N, group_size, nibble_mask, BLOCK_N,
                                   BLOCK_K, tl.float32 if BLOCK_M == 1 else x.dtype)
                if BLOCK_M == 1:
                    acc += tl.reshape(x, (BLOCK_K, 1)).to(tl.float32) * (qz * scales[None, :])
                else:
                    acc += tl.dot(x, qz) * scales[None, :]
        if BLOCK_M == 1:
            acc = tl.reshape(tl.sum(acc, 0), (1, BLOCK_N))
    n_ok = offs_n < N
    # The bias (q/k/v of Qwen2) is added in fp32 before the output's one rounding: no kernel of its own per call.
    bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :] if HAS_BIAS else 0.0

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if not SPLIT:
        tl.store(out_ptrs, (acc + bias).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # Partials go to ws[split, M, N]; the last of the tile's split_k programs to arrive adds them up in split
        # order (deterministic), writes the output and resets the tile's counter for the next launch.
        tl.store(ws_ptr + (pid_k * M + offs_m)[:, None] * N + offs_n[None, :], acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before this program's arrival is counted
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")  # release our partial, acquire the others'
        if arrived == split_k - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if BLOCK_M == 1:
                # Eight splits' partials a load: the merge waits for split / 8 round trips to L2 in turn rather
                # than one per split (86 for the in-place GEMV of an 11008-deep down projection).
                parts = tl.arange(0, 8)
                for s0 in range(0, split_k, 8):
                    rows = (s0 + parts) * M + pid_m
                    chunk = tl.load(ws_ptr + rows[:, None] * N + offs_n[None, :], other=0.0, cache_modifier=".cg",
                                    mask=((s0 + parts) < split_k)[:, None] & n_ok[None, :])
                    total += tl.sum(chunk, 0)[None, :]
            else:
                for s in range(split_k):
                    total += tl.load(ws_ptr + (s * M + offs_m)[:, None] * N + offs_n[None, :], mask=mask, other=0.0,
                                     cache_modifier=".cg")
            tl.store(out_ptrs, (total + bias).to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(count_ptr + tile, 0)


@triton.jit
def _awq_dequant(qw_ptr, qz_ptr, sc_ptr, w_ptr, N, group_size, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W^T [K, N] in w's dtype, one [BLOCK_K, BLOCK_N] tile per program: (q - z) * scale, exact in fp32, rounded
    once, as awq.dequantize rounds."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.program_id(1) * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    qz, scales = _tile(qw_ptr, qz_ptr, sc_ptr, k0, offs_w, offs_n, N, group_size, 0xF, BLOCK_N, BLOCK_K, tl.float32)
    w = (qz * scales[None, :]).to(w_ptr.dtype.element_ty)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w, mask=(offs_n < N)[None, :])


@dataclass(frozen=True)
class Config:
    """One row of the table: the path and its launch parameters, for token counts up to max_m."""
    kernel: str = "fused"        # "fused" (the kernel above), "dense" (dequantize, then torch's matmul) or
                                 # "int4mm" (torch's int4 kernel)
    block: tuple = (16, 64, 64)  # BLOCK_M, BLOCK_N, BLOCK_K; BLOCK_K is cut to a divisor of the group size
    split: int = 1               # programs sharing one output tile's K
    warps: int = 4
    stages: int = 3
    max_m: int | None = None     # None: every larger M
    unpack: str = "interleave"   # one-row tiles may unpack "slots" (_gemv_by_slot) or "in-place" (_gemv_in_place),
                                 # larger ones "lanes" (_gemm_lanes)

    @classmethod
    def from_json(cls, d: dict) -> "Config":
        return cls(**{**d, "block": tuple(d.get("block", cls.block))})

    def to_json(self) -> dict:
        if self.kernel != "fused":
            return {"max_m": self.max_m, "kernel": self.kernel}
        unpack = {} if self.unpack == "interleave" else {"unpack": self.unpack}
        return {"max_m": self.max_m, "kernel": self.kernel, "block": list(self.block), "split": self.split,
                "warps": self.warps, "stages": self.stages} | unpack

    @property
    def rounds_weights(self) -> bool:
        """Whether the path multiplies by the weights rounded to x's dtype (the dense path, prefill tiles), not the
        exact ones."""
        return self.kernel == "dense" or (self.kernel == "fused" and self.block[0] >= ROUNDED_ROWS.value)

    @property
    def slots(self) -> bool:
        return self.unpack == "slots"

    @property
    def in_place(self) -> bool:
        return self.unpack == "in-place"

    @property
    def compiled(self) -> tuple:
        """What selects the fused kernel's compiled variant: the split's count is a runtime argument, not a part."""
        return self.block, self.split > 1, self.warps, self.stages, self.unpack

    @property
    def path(self) -> str:
        """What runs, in words: dense, int4mm, gemv, gemm, or either with split-k."""
        if self.kernel != "fused":
            return self.kernel
        name = "gemv" if self.block[0] == 1 else "gemm"
        if self.in_place:
            return "gemv+groups"  # split K / group_size ways, whatever `split` says
        return f"{name}+split{self.split}" if self.split > 1 else name

    def __str__(self) -> str:
        if self.kernel != "fused":
            return self.kernel
        unpack = "" if self.unpack == "interleave" else f" {self.unpack}"
        return f"{self.path} {'x'.join(map(str, self.block))} w{self.warps} s{self.stages}{unpack}"


def parse_table(raw: dict) -> dict:
    """{device class: [(n, k, [Config, ...] by ascending max_m)]} from the JSON table's structure."""
    return {cls: [(s["n"], s["k"], [Config.from_json(c) for c in s["configs"]]) for s in entry["shapes"]]
            for cls, entry in raw.items()}


def shape_configs(table: dict, device_name: str, n: int, k: int) -> list[Config]:
    """The device class's (else "default") configs, by M bucket, for the tuned shape nearest (N, K)."""
    shapes = table.get(device_class(device_name), table["default"])
    return min(shapes, key=lambda s: abs(math.log(s[0] / n)) + abs(math.log(s[1] / k)))[2]


def select(table: dict, device_name: str, n: int, k: int, m: int) -> Config:
    """The config of the first M bucket that holds m (the last bucket holds every larger m)."""
    configs = shape_configs(table, device_name, n, k)
    return next((c for c in configs if c.max_m is None or m <= c.max_m), configs[-1])


def table_path() -> Path:
    return kernel_tables.table_file(CONFIGS, "AWQ_CONFIGS")


@functools.cache
def _table() -> dict:
    return parse_table(json.loads(table_path().read_text()))


@functools.cache
def pick_config(device_name: str, n: int, k: int, m: int) -> Config:
    """`select` over the table in use (read once), memoized: serving looks a config up for every linear of every
    step."""
    return select(_table(), device_name, n, k, m)


def uses_int4mm(device: torch.device, n: int, k: int) -> bool:
    """Whether the table in use gives torch's int4 kernel any token count of (N, K) on this device."""
    return any(c.kernel == "int4mm" for c in shape_configs(_table(), kernel_tables.device_name(device), n, k))


# The tile rows each unpacking other than interleaving is for (prefill tiles have their own, _rounded_tile).
UNPACK_ROWS = {"slots": (1, 1), "in-place": (1, 1), "lanes": (16, ROUNDED_ROWS.value - 1)}


# For a layer whose table row says int4mm but that the kernel does not take (group size, K): a tile for any M.
GENERAL = Config(block=(16, 64, 128), split=4)


def dequantize_triton(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """W^T [K, N] in `dtype` (the transpose of awq.dequantize's result, bit for bit)."""
    k, n = qweight.shape[0], scales.shape[1]
    w = torch.empty(k, n, dtype=dtype, device=qweight.device)
    block_k = math.gcd(32, group_size)
    _awq_dequant[(k // block_k, triton.cdiv(n, 128))](qweight, qzeros, scales, w, n, group_size, BLOCK_N=128,
                                                       BLOCK_K=block_k, **TRITON_OPTIONS)
    return w


def awq_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
             config: Config | None = None, bias: torch.Tensor | None = None, gated: bool = False,
             int4=None) -> torch.Tensor:
    """x [..., K] (fp16/bf16) times the packed weight, plus `bias` [N] if given -> [..., N] in x's dtype; gated: x is
    [..., 2K] = [gate | up], and the product is of silu(gate) * up (the fused kernels compute it as they load x);
    `config` overrides the table; `int4`: the same weight as an awq.Int4Pack, for the int4mm rows."""
    k, n = qweight.shape[0], scales.shape[1]
    if config is None:
        config = pick_config(kernel_tables.device_name(x.device), n, k, x.numel() // x.shape[-1])
        if config.kernel == "int4mm" and int4 is None:
            config = GENERAL
    if config.kernel == "int4mm":
        if int4 is None:
            raise ValueError("the int4mm path needs the weight as an awq.Int4Pack (AWQLinear.prepare)")
        return int4(x, bias, gated)
    x2 = x.reshape(-1, 2 * k if gated else k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if config.kernel == "dense":
        x2 = silu_and_mul(x2) if gated else x2
        w = dequantize_triton(qweight, qzeros, scales, group_size, x.dtype)
        out = x2 @ w if bias is None else torch.addmm(bias.to(x.dtype), x2, w)
        return out.reshape(*x.shape[:-1], n)
    block_m, block_n, block_k = config.block
    low, high = UNPACK_ROWS.get(config.unpack, (block_m, block_m))
    if not low <= block_m <= high:
        raise ValueError(f"{config}: unpacking {config.unpack} is for "
                         + ("one-row tiles" if high == 1 else f"tiles of {low} to {high} rows"))
    block_k = math.gcd(block_k, group_size)
    # In place: a program per group, whatever the config's split (the table's shape may be a neighbour's).
    split = k // group_size if config.in_place else max(1, min(config.split, k // block_k))
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), split, triton.cdiv(m, block_m))
    ws = counters = None  # a single split writes the output directly
    if split > 1:
        ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
        counters = arrival_counters(x.device, grid[0] * grid[2])
    _awq_gemm[grid](x2, qweight, qzeros, scales, bias, out, ws, counters, m, n, k, group_size, x2.stride(0),
                    out.stride(0), split, 0xF, SPLIT=split > 1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                    STAGES=config.stages, SLOTS=config.slots, IN_PLACE=config.in_place, LANES=config.unpack == "lanes",
                    HAS_BIAS=bias is not None, GATED=gated, num_warps=config.warps, **TRITON_OPTIONS)
    return out.reshape(*x.shape[:-1], n)
