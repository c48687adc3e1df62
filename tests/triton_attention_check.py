"""The Triton paged attention against per-sequence SDPA over the gathered context.

`python -m tests.triton_attention_check cuda` runs it compiled on a GPU (bf16 and real 7B shapes too);
tests/test_triton_attention.py runs it on the CPU in Triton's interpreter, and compiled for sm_90 without a GPU
(`python -m tests.triton_attention_check compile`).
"""
import sys

import torch
import torch.nn.functional as F
import triton

from bench.sass import compile_for_sm90
from services.common import cuda_graphs
from services.llm_decoder.engine.triton_attention import _attn, paged_attention


def make(h, h_kv, d, page, dtype, qlens, ctxs, seed):
    g = torch.Generator().manual_seed(seed)
    need = [-(-c // page) for c in ctxs]
    nblocks = sum(need) + 3
    # Unused slots hold NaN: reading any key outside a sequence's context would poison its output.
    k_cache = torch.full((nblocks, page, h_kv, d), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    ids = torch.randperm(nblocks, generator=g)  # shuffled, non-contiguous block ids
    tables = torch.zeros(len(ctxs), max(need) + 1, dtype=torch.int32)
    used = 0
    for b, c in enumerate(ctxs):
        tables[b, :need[b]] = ids[used:used + need[b]]
        used += need[b]
        for i in range(c):
            blk, slot = tables[b, i // page], i % page
            k_cache[blk, slot] = torch.randn(h_kv, d, generator=g).to(dtype)
            v_cache[blk, slot] = torch.randn(h_kv, d, generator=g).to(dtype)
    q = torch.randn(sum(qlens), h, d, generator=g).to(dtype)
    cu = torch.tensor([0] + qlens, dtype=torch.int32).cumsum(0).to(torch.int32)
    return q, k_cache, v_cache, cu, torch.tensor(ctxs, dtype=torch.int32), tables

def reference(q, k_cache, v_cache, cu, ctxs, tables, scale, offset="end"):
    # offset: "end" is the semantics; "start" (a wrong causal offset) and "none" only show the test can fail
    page, out = k_cache.shape[1], []
    for b in range(len(ctxs)):
        s, e, c = int(cu[b]), int(cu[b + 1]), int(ctxs[b])
        slots = [int(tables[b, i // page]) * page + i % page for i in range(c)]
        k = k_cache.flatten(0, 1)[slots].float().transpose(0, 1)
        v = v_cache.flatten(0, 1)[slots].float().transpose(0, 1)
        qpos = torch.arange(e - s)[:, None] + (c - (e - s) if offset == "end" else 0)
        mask = torch.arange(c)[None, :] <= qpos if offset != "none" else None
        if c == 0:
            out.append(torch.zeros(e - s, q.shape[1], q.shape[2]))
            continue
        o = F.scaled_dot_product_attention(q[s:e].float().transpose(0, 1), k, v, attn_mask=mask, scale=scale,
                                           enable_gqa=True)
        out.append(o.transpose(0, 1))
    return torch.cat(out)


def main(device: str) -> None:
    # (H, H_kv, d, block_size, dtype, query lens, context lens, num_splits): a context of 0 is a padded row
    cases = [
        (4, 1, 64, 16, torch.float32, [1, 20, 1, 5, 1], [37, 53, 0, 5, 70], None),  # mixed decode + chunks on a prefix
        (14, 2, 64, 4, torch.float32, [3, 1, 12], [10, 9, 12], None),  # Qwen2-0.5B heads, 7 per group, 4-key pages
        (4, 4, 128, 8, torch.float16, [1, 9, 1], [19, 30, 1], None),  # no GQA, head_dim 128
        (8, 2, 128, 16, torch.float16, [1, 1, 1, 1], [150, 1, 0, 77], 4),  # flash-decoding, an empty split
        (8, 2, 64, 16, torch.float32, [1, 1, 1], [150, 33, 0], 2),  # two splits of several tiles
        (8, 8, 64, 32, torch.float16, [1, 7], [64, 40], None),
    ]
    # bfloat16 only on GPUs: the interpreter multiplies its raw bits in tl.dot (triton-lang/triton#11584).
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
    if device != "cpu":  # the 7B shapes (32 heads over 8, d 128): 64 decode rows of 2k, a 4k chunk over a 1k prefix
        cases += [(32, 8, 128, 16, torch.bfloat16, [1] * 64, [2048 + 13 * i for i in range(64)], None),
                  (32, 8, 128, 16, torch.bfloat16, [1, 4096, 1], [300, 5120, 0], None),
                  (32, 8, 128, 16, torch.bfloat16, [1, 1], [4000, 7], None),
                  (14, 2, 64, 16, torch.bfloat16, [1, 700, 1], [1500, 700, 31], None)]
    for i, (h, h_kv, d, page, dtype, qlens, ctxs, splits) in enumerate(cases):
        q, kc, vc, cu, cl, bt = make(h, h_kv, d, page, dtype, qlens, ctxs, seed=i)
        args = [t.to(device) for t in (q, kc, vc, cu, cl, bt)]
        got = paged_attention(*args, d ** -0.5, max(qlens), num_splits=splits).cpu()
        want = reference(q, kc, vc, cu, cl, bt, d ** -0.5)
        assert got.shape == q.shape and got.dtype == dtype, (i, got.shape, got.dtype)
        live = torch.cat([torch.full((n,), c > 0) for n, c in zip(qlens, ctxs)])
        err = (got.float() - want)[live].abs().max().item()
        assert err < tol[dtype], (i, err)
        if i == 0:  # the inputs tell a wrong causal offset, or none, apart
            for wrong in ("start", "none"):
                bad = reference(q, kc, vc, cu, cl, bt, d ** -0.5, offset=wrong)
                assert (bad - want)[live].abs().max().item() > 100 * tol[dtype], wrong
    # The last split of each tile resets its arrival counter for the next launch.
    assert not cuda_graphs._counters[args[0].device][-1].any()  # keyed as the tensors say: cuda:0
    try:
        paged_attention(*args, 1.0, 1, num_splits=3)
        raise AssertionError("num_splits=3 accepted")
    except ValueError:
        pass
    print("ok")


def compile_sm90() -> None:
    """The kernel as the served models launch it (paged_attention's tiles), compiled for sm_90 (H100/H200): decode
    (split or not) and prefill tiles of InternLM2.5-7B (32 heads over 8, d 128, bf16) and Qwen2.5-0.5B (14 over 2,
    d 64), and the fp32 one at 0.5B shapes in IEEE precision."""
    strides = ("stride_qt", "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs", "stride_vh",
               "stride_ot", "stride_oh")  # num_seqs and stride_bt: not specialized (see _attn)
    for heads, kv_heads, d, dtype in ((32, 8, 128, "bf16"), (14, 2, 64, "bf16"), (14, 2, 64, "fp32")):
        group = heads // kv_heads
        for decode, splits in ((True, 16), (True, 1), (False, 1)):
            block_m = max(16 if decode else 64, triton.next_power_of_2(group))
            split = {"part_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "count_ptr": "*i32"}
            types = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
                     **(split if splits > 1 else {}), "cu_q_ptr": "*i32", "ctx_ptr": "*i32", "bt_ptr": "*i32",
                     "qk_scale": "fp32", "num_seqs": "i32", "stride_bt": "i32", **{name: "i32" for name in strides}}
            constants = {"GROUP": group, "BLOCK_Q": block_m // group, "BLOCK_M": block_m, "BLOCK_N": 64, "PAGE": 16,
                         "HEAD_DIM": d, "HEAD_PAD": triton.next_power_of_2(d), "SPLITS": splits,
                         "PRECISION": "ieee" if dtype == "fp32" else None,
                         **({} if splits > 1 else dict.fromkeys(split))}
            compile_for_sm90(_attn, types, constants, strides, num_warps=4, num_stages=2)
    print("ok")


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    compile_sm90() if mode == "compile" else main(mode)
