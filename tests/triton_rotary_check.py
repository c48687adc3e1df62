"""The Triton rotary + K/V cache write against the model's own CPU path (rotate, then index_copy_ into the caches).

`python -m tests.triton_rotary_check cuda` runs it compiled on a GPU; tests/test_triton_rotary.py runs it on the CPU
in Triton's interpreter, and compiled for sm_90 without a GPU (`python -m tests.triton_rotary_check compile`).
"""
import sys

import torch

from bench.sass import compile_for_sm90
from services.llm_decoder.engine.triton_rotary import _rotary_and_cache, rotary_and_cache
from services.llm_decoder.models import llama

# (query heads, KV heads, head_dim, dtype): InternLM2.5-7B, Qwen2.5-0.5B in fp32 and bf16, and widths that are no
# power of two (3 KV heads, a 40-wide half) in fp16.
CASES = [(32, 8, 128, torch.bfloat16), (14, 2, 64, torch.float32), (14, 2, 64, torch.bfloat16),
         (6, 3, 80, torch.float16)]


def inputs(h, h_kv, d, dtype, t, seed):
    """q, k, v as the model passes them (views of one fused qkv output), cos/sin [t, d], caches of 4-slot blocks
    filled with sentinels, and t distinct random slots."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (h + 2 * h_kv) * d, generator=g).to(dtype)
    q, k, v = qkv.split([h * d, h_kv * d, h_kv * d], dim=-1)
    angles = (torch.rand(t, d // 2, generator=g) * 100).repeat(1, 2)  # rotate-half: both halves turn alike
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    blocks = t // 4 + 3
    k_cache = torch.randn(blocks, 4, h_kv, d, generator=g).to(dtype)
    v_cache = torch.randn(blocks, 4, h_kv, d, generator=g).to(dtype)
    slots = torch.randperm(blocks * 4, generator=g)[:t]
    return qkv, (q.view(t, h, d), k.view(t, h_kv, d), v.view(t, h_kv, d), cos, sin, k_cache, v_cache, slots)


def expected(args):
    """The CPU path computed in fp32 and rounded once (what the kernel does; eager bf16 rounds after every op)."""
    q, k, v, cos, sin, k_cache, v_cache, slots = [a.clone() for a in args]
    dtype = q.dtype
    wide = [x.float() for x in (q, k, v, cos, sin, k_cache, v_cache)]
    q, k = llama.rotary_and_cache(*wide, slots)
    return q.to(dtype), k.to(dtype), wide[5].to(dtype), wide[6].to(dtype)


def main(device: str) -> None:
    for i, (h, h_kv, d, dtype) in enumerate(CASES):
        for t in (1, 5, 37):
            qkv, args = inputs(h, h_kv, d, dtype, t, seed=10 * i + t)
            want_q, want_k, want_kc, want_vc = expected(args)
            qkv = qkv.to(device)
            q, k, v = qkv.split([h * d, h_kv * d, h_kv * d], dim=-1)
            q, k, v = q.view(t, h, d), k.view(t, h_kv, d), v.view(t, h_kv, d)
            rest = [a.to(device) for a in args[3:]]
            rotary_and_cache(q, k, v, *rest)
            got = [x.cpu() for x in (q, k, rest[2], rest[3])]
            # The interpreter computes as the reference does (exact), but its cast to bf16 truncates; a GPU may
            # contract to FMAs. Either is one last-place unit at most.
            exact = device == "cpu" and dtype != torch.bfloat16
            ulp = torch.finfo(dtype).eps
            for name, g, w in zip(("q", "k", "k_cache", "v_cache"), got, (want_q, want_k, want_kc, want_vc)):
                ok = torch.equal(g, w) if exact else torch.allclose(g.float(), w.float(), rtol=ulp, atol=ulp)
                assert ok, (h, h_kv, d, dtype, t, name, (g.float() - w.float()).abs().max().item())
            # q and k were rotated where they are: the fused output's storage holds them.
            assert torch.equal(qkv[:, :h * d].cpu(), got[0].flatten(1))
    try:
        qkv, args = inputs(4, 2, 6, torch.float32, 2, seed=0)
        rotary_and_cache(*args[:5], args[5].transpose(0, 1), *args[6:])
        raise AssertionError("a non-contiguous cache accepted")
    except ValueError:
        pass
    print("ok")


def compile_sm90() -> None:
    """The kernel as the served models launch it, compiled for sm_90 (H100/H200)."""
    for h, h_kv, d, dtype in CASES:
        ty = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
        strides = ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_ct",
                   "stride_cs")
        types = {**{name: f"*{ty}" for name in ("q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "kc_ptr", "vc_ptr")},
                 "slot_ptr": "*i64", **{name: "i32" for name in strides}}
        constants = {"H": h, "H_KV": h_kv, "H_PAD": 1 << (h - 1).bit_length(), "H_KV_PAD": 1 << (h_kv - 1).bit_length(),
                     "HALF": d // 2, "HALF_PAD": 1 << (d // 2 - 1).bit_length()}
        compile_for_sm90(_rotary_and_cache, types, constants, strides if d % 32 == 0 else (), num_warps=4)
    print("ok")


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    compile_sm90() if mode == "compile" else main(mode)
