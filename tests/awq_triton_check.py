"""The AWQ Triton paths against the dequantized weight's matmul, in Triton's interpreter (run by test_awq_triton.py;
TRITON_INTERPRET=1 must be set before triton is imported, hence a process of its own):

    TRITON_INTERPRET=1 python -m tests.awq_triton_check paths|table|tune
    python -m tests.awq_triton_check compile      # not interpreted: compiled for sm_90, no GPU needed
"""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter

from bench import awq as bench
from bench.sass import compile_awq, compile_for_sm90
from services.common import cuda_graphs
from services.llm_decoder.models import awq
from services.llm_decoder.models import awq_triton as at


def _bf16_like_the_gpu() -> None:
    """The interpreter keeps bf16 as raw uint16: its tl.dot and arithmetic work on the bit patterns
    (triton-lang/triton#11584; bf16 is unsupported there) and its fp32 -> bf16 cast truncates where the GPU rounds
    to nearest even. These are routed through torch here, which computes them as the GPU does (arithmetic in fp32,
    rounded back)."""
    builder = interpreter.InterpreterBuilder
    cast, dot, sub, mul = builder.cast_impl, builder.create_dot, builder.create_fsub, builder.create_fmul

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = torch.from_numpy(np.ascontiguousarray(src.data)).bfloat16().view(torch.int16).numpy()
            return interpreter.TensorHandle(bits.view(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    def as_fp32(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        values = torch.from_numpy(np.ascontiguousarray(h.data).view(np.int16)).view(torch.bfloat16).float()
        return interpreter.TensorHandle(values.numpy(), tl.float32)

    def in_fp32(op):
        def run(self, a, b):
            if a.dtype.scalar != tl.bfloat16:
                return op(self, a, b)
            return cast_impl(self, op(self, as_fp32(a), as_fp32(b)), tl.bfloat16)
        return run

    builder.cast_impl = cast_impl
    builder.create_dot = lambda self, a, b, d, *args: dot(self, as_fp32(a), as_fp32(b), d, *args)
    builder.create_fsub, builder.create_fmul = in_fp32(sub), in_fp32(mul)


def run(cfg: at.Config | None, m: int, k: int, n: int, group: int, dtype: torch.dtype, seed: int = 0,
        lead: tuple = (), bias: bool = False, gated: bool = False) -> float:
    """awq_gemm (cfg, or the committed table's pick; with an fp16 bias, as AWQ checkpoints store it; gated: x is
    [gate | up]) against its input times the weight its path computes with (bench.operands); the error's share of
    its bound. A gated input is silu_and_mul's, within two roundings (eager silu_and_mul rounds twice, the kernels
    once). The int4mm path runs torch's CPU int4 kernel on the same conversion of the AWQ tensors."""
    g = torch.Generator().manual_seed(seed)
    q = awq.quantize(torch.randn(n, k, generator=g), group)
    x = torch.randn(*lead, m, 2 * k if gated else k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).half() if bias else None
    path = cfg or at.pick_config("cpu", n, k, m)
    int4 = awq.Int4Pack(q["qweight"], q["qzeros"], q["scales"], group) if path.kernel == "int4mm" else None
    got = at.awq_gemm(x, q["qweight"], q["qzeros"], q["scales"], group, config=cfg, bias=b, gated=gated, int4=int4)
    assert got.shape == (*lead, m, n), got.shape
    what = f"{path} m={m} k={k} n={n} group={group} {dtype}" + " bias" * bias + " gated" * gated
    x_in, x_error = bench.linear_input(x, gated)
    share = bench.check(got, **bench.operands(q, group, path, x_in, x_error), what=what, bias=b)
    if path.kernel == "int4mm":
        # Its weight is AWQ's (q - z) * scale but for the rounding of scale and zero = (8 - z) * scale to bf16: half
        # a bf16 ulp of the scale per unit of |q - z| <= 15 and of |8 - z| <= 8.
        exact = awq.dequantize(q["qweight"], q["qzeros"], q["scales"], group, torch.float32)
        scale = q["scales"].float().repeat_interleave(group, 0).t()
        error = (awq.int4mm_weight(q["qweight"], q["qzeros"], q["scales"], group) - exact).abs() / scale
        assert error.max() <= 23 * 2.0 ** -8, f"{what}: int4mm's weight is {error.max():.3f} scales off AWQ's"
    else:
        # And so the dequantize path's result, whose weights are rounded to x's dtype, within that rounding (twice
        # that for prefill tiles in bf16, whose scale is rounded first, and whose weight may then round the other
        # way).
        rounded = awq.dequantize(q["qweight"], q["qzeros"], q["scales"], group, dtype)
        eps = torch.finfo(dtype).eps * (1.5 if path.kernel == "fused" and path.rounds_weights else 0.5)
        bench.check(got, x_in, rounded, f"{what} (dequantize path)", eps + x_error, bias=b)
    return share


def paths() -> None:
    """Each path at its edges: one token, M off the block, N a multiple of 8 but not of BLOCK_N, several groups per
    program, group 64 and 128 (and a BLOCK_K cut to the group), splits that leave a program no K, fp16 and bf16."""
    f16, b16 = torch.float16, torch.bfloat16
    cases = [
        (at.Config(block=(1, 64, 64), split=1), 1, 256, 136, 128, f16),
        (at.Config(block=(1, 128, 64), split=1), 1, 256, 136, 64, b16),
        (at.Config(block=(1, 64, 64), split=3), 1, 256, 136, 64, b16),         # 4 K blocks over 3 splits: 1, 1, 2
        (at.Config(block=(1, 64, 128), split=4), 1, 512, 72, 128, f16),
        (at.Config(block=(1, 64, 64), unpack="slots"), 1, 256, 136, 128, f16),       # slots: words past N masked
        (at.Config(block=(1, 128, 64), split=3, unpack="slots"), 1, 256, 136, 64, b16),
        (at.Config(block=(1, 64, 128), split=4, unpack="slots"), 1, 512, 72, 128, f16),
        (at.Config(block=(1, 512, 16), split=3), 1, 256, 136, 64, b16),      # wide tiles: most columns masked
        (at.Config(block=(1, 256, 32), unpack="slots"), 1, 256, 264, 128, f16),
        (at.Config(block=(1, 64, 64), stages=1, unpack="slots"), 1, 256, 136, 128, f16),  # single stage
        (at.Config(block=(1, 128, 64), split=2, stages=1), 1, 256, 136, 64, b16),
        # In place: a program per group whatever the config's split (2, 8, 1 groups here), BLOCK_K under, at and cut
        # to the group, tiles past N masked.
        (at.Config(block=(1, 128, 64), split=5, unpack="in-place"), 1, 256, 136, 128, f16),
        (at.Config(block=(1, 64, 32), stages=1, unpack="in-place"), 1, 512, 72, 64, b16),
        (at.Config(block=(1, 256, 128), unpack="in-place"), 1, 128, 264, 128, f16),
        (at.Config(block=(1, 128, 128), stages=2, unpack="in-place"), 1, 256, 136, 64, b16),
        # More splits than the one-token merge loads at once (8): 20 groups in place, 12 splits of 16 blocks.
        (at.Config(block=(1, 64, 32), unpack="in-place"), 1, 1280, 72, 64, f16),
        (at.Config(block=(1, 64, 64), split=12), 1, 1024, 72, 64, b16),
        (at.Config(block=(16, 64, 128), split=4), 5, 512, 136, 128, f16),
        # In lanes: M off the block, words past N masked, BLOCK_K cut to the group, splits, a 32-row tile.
        (at.Config(block=(16, 128, 64), unpack="lanes"), 5, 256, 136, 128, f16),
        (at.Config(block=(16, 256, 128), split=2, unpack="lanes"), 16, 256, 264, 64, b16),
        (at.Config(block=(32, 128, 64), split=3, unpack="lanes"), 20, 512, 200, 128, f16),
        (at.Config(block=(16, 128, 128), split=2), 16, 256, 136, 64, b16),     # BLOCK_K 128 cut to the group's 64
        (at.Config(block=(32, 64, 64), split=1), 33, 256, 264, 128, f16),
        (at.Config(block=(64, 128, 64), split=2), 70, 384, 200, 64, b16),
        (at.Config(block=(128, 256, 64), split=1, warps=8), 130, 256, 264, 128, f16),
        (at.Config(kernel="dense"), 33, 256, 264, 128, f16),
        (at.Config(kernel="dense"), 40, 256, 136, 64, b16),
        # torch's int4 kernel: one token, M off its 16-row tile, K of 2 and 8 packed k-tiles a word, groups 32-128.
        (at.Config(kernel="int4mm"), 1, 256, 144, 128, f16),
        (at.Config(kernel="int4mm"), 21, 96, 272, 32, b16),
        (at.Config(kernel="int4mm"), 5, 512, 16, 64, f16),
    ]
    for cfg, m, k, n, group, dtype in cases:
        run(cfg, m, k, n, group, dtype)
    # Leading dimensions pass through; rows of x need not be contiguous (stride(0) != K).
    run(at.Config(block=(16, 64, 64), split=2), 3, 128, 64, 64, f16, lead=(2,))
    q = awq.quantize(torch.randn(64, 128), 64)
    x = torch.randn(4, 192).half()[:, :128]
    strided = at.Config(block=(16, 64, 64))
    bench.check(at.awq_gemm(x, q["qweight"], q["qzeros"], q["scales"], 64, strided),
                **bench.operands(q, 64, strided, x, 0.0), what="strided x")
    # A bias is added in every path's epilogue, and a gated input ([gate | up], the down projection's) is gated in
    # every path (split or not, one row, slots, in place, tiles, lanes, prefill tiles, dense), in either dtype.
    every_path = [at.Config(block=(1, 128, 64), split=3), at.Config(block=(1, 64, 64), unpack="slots"),
                  at.Config(block=(1, 128, 64), unpack="in-place"),
                  at.Config(block=(16, 64, 128), split=4), at.Config(block=(16, 128, 64), split=2, unpack="lanes"),
                  at.Config(block=(32, 64, 64)), at.Config(block=(64, 64, 64), split=2), at.Config(kernel="dense")]
    for i, cfg in enumerate(every_path):
        m = 1 if cfg.block[0] == 1 else 20
        run(cfg, m, 256, 136, 64, (f16, b16)[i % 2], bias=True)
        run(cfg, m, 256, 136, 64, (b16, f16)[i % 2], lead=(1,) * (i % 2), gated=True)
    run(at.Config(kernel="int4mm"), 3, 256, 144, 64, f16, bias=True)
    run(at.Config(kernel="int4mm"), 1, 256, 144, 64, b16, lead=(2,), gated=True)
    # A table row of torch's int4 kernel for a layer without an Int4Pack (a group size or K it does not take) runs
    # the general tile instead; asked for by name, it is refused.
    pick, at.pick_config = at.pick_config, lambda *args: at.Config(kernel="int4mm")
    try:
        x = torch.randn(3, 128).half()
        assert torch.equal(at.awq_gemm(x, q["qweight"], q["qzeros"], q["scales"], 64),
                           at.awq_gemm(x, q["qweight"], q["qzeros"], q["scales"], 64, at.GENERAL))
    finally:
        at.pick_config = pick
    try:
        at.awq_gemm(x, q["qweight"], q["qzeros"], q["scales"], 64, at.Config(kernel="int4mm"))
    except ValueError as e:
        assert "Int4Pack" in str(e), e
    else:
        raise AssertionError("int4mm ran without its Int4Pack")
    # An unpacking meant for other tiles is refused, not run.
    for bad in (at.Config(block=(1, 128, 64), unpack="lanes"), at.Config(block=(16, 64, 64), unpack="slots"),
                at.Config(block=(16, 64, 64), unpack="in-place"), at.Config(block=(64, 64, 64), unpack="lanes")):
        try:
            run(bad, 1, 256, 136, 64, f16)
        except ValueError as e:
            assert f"unpacking {bad.unpack} is for" in str(e), e
        else:
            raise AssertionError(f"{bad} ran")
    # Every split-K launch leaves its tile counters at zero for the next one.
    assert not cuda_graphs._counters[torch.device("cpu")][-1].any()
    # The dense path's dequantization equals awq.dequantize bit for bit.
    for dtype in (f16, b16):
        got = at.dequantize_triton(q["qweight"], q["qzeros"], q["scales"], 64, dtype)
        assert torch.equal(got.t(), awq.dequantize(q["qweight"], q["qzeros"], q["scales"], 64, dtype)), dtype


def table() -> None:
    """Every config of the committed table, for every device class, at the lowest M of its bucket (not a multiple of
    BLOCK_M), N two tiles and a ragged 8 (int4mm: 16) wide, K long enough for its split."""
    raw = json.loads(at.CONFIGS.read_text())
    seen = set()
    for cls, shapes in at.parse_table(raw).items():
        for _, _, configs in shapes:
            low = 1
            for cfg in configs:
                key = (cfg.kernel, cfg.block, cfg.split, low)
                if key not in seen:
                    seen.add(key)
                    bk, bn = (128, 64) if cfg.kernel == "dense" else (min(cfg.block[2], 128), cfg.block[1])
                    k = max(256, -(-cfg.split * bk // 128) * 128)
                    ragged = 16 if cfg.kernel == "int4mm" else 8  # torch's CPU int4 kernel takes 16 channels at once
                    run(cfg, low, k, 2 * bn + ragged, 128, torch.float16 if len(seen) % 2 else torch.bfloat16)
                low = (cfg.max_m or low) + 1
    # Without a config, awq_gemm dispatches through the table (here: the default class).
    for m in (1, 16, 100, 300):
        run(None, m, 256, 136, 128, torch.float16)


def tune() -> None:
    """The tuner on a tiny shape with three candidates per token count (torch's int4 kernel among them): it writes a
    table that parses and dispatches its choice, and keeps the other device classes of the file."""
    bench.candidates = lambda m, n, k, sms, device: [at.Config(block=(16, 64, 64), split=2),
                                                     at.Config(kernel="dense"), at.Config(kernel="int4mm")]
    k, n = 256, 80
    q = awq.quantize(torch.randn(n, k), bench.GROUP)
    layers = {"tiny": (q, awq.dequantize(q["qweight"], q["qzeros"], q["scales"], bench.GROUP, torch.float16))}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "table.json"
        path.write_text(json.dumps({"default": {"source": "test", "shapes": []},
                                    "other": {"source": "kept", "shapes": [{"n": 8, "k": 8, "configs": []}]}}))
        raw, wrong = bench.tune(layers, [("tiny", k, n)], [1, 4], "NVIDIA H200", True, path)
        assert json.loads(path.read_text()) == raw
    table = at.parse_table(raw)
    assert not wrong and raw["other"]["source"] == "kept" and "H100/H200" in raw
    configs = at.shape_configs(table, "NVIDIA H200", n, k)
    assert configs[-1].max_m is None and all(c.kernel in ("fused", "dense", "int4mm") for c in configs)
    run(at.select(table, "NVIDIA H200", n, k, 3), 3, k, n, bench.GROUP, torch.float16)


def compile_sm90() -> None:
    """Every fused config of the committed table (fp16 with a bias and a gated input, and bf16 for one-row and split
    tiles), the widest one-token candidate of each kind the table may not hold yet, and the dequantize kernel,
    compiled for sm_90 (H100/H200) by Triton's compiler and ptxas: what the interpreter cannot catch (types, layouts,
    resources) fails here rather than on the GPU. (The tuner skips a candidate that does not compile there; all of
    them here took 87 compiles, 90 s of `make test`.)"""
    seen = set()
    tables = at.parse_table(json.loads(at.CONFIGS.read_text())).values()
    # Per unpacking, rows, split or not and pipelined or not: the most weights a step (registers run out there first).
    widest = {}
    for c in (c for c in bench.candidates(1, 2560, 2048, 132, torch.device("cuda")) if c.kernel == "fused"):
        kind = (c.unpack, c.block[0], c.split > 1, c.stages > 1)
        widest[kind] = max(widest.get(kind, c), c, key=lambda cfg: cfg.block[1] * cfg.block[2])
    for configs in [c for shapes in tables for _, _, c in shapes] + [list(widest.values())]:
        for cfg in (c for c in configs if c.kernel == "fused"):
            # (dtype, bias, gated): q/k/v's bias and the down projection's gated input in one kernel (it holds
            # each alone's code and more), bf16 activations
            variants = [("fp16", True, True)]
            for dtype, bias, gated in variants + [("bf16", False, False)] * (cfg.block[0] == 1 or cfg.split > 1):
                key = (cfg.compiled, dtype, bias, gated)
                if key not in seen:
                    seen.add(key)
                    compile_awq(at._awq_gemm, cfg, dtype, bias, gated)
    for dtype in ("fp16", "bf16"):
        compile_for_sm90(at._awq_dequant, {"qw_ptr": "*i32", "qz_ptr": "*i32", "sc_ptr": "*fp16", "w_ptr": f"*{dtype}",
                                           "N": "i32", "group_size": "i32"}, {"BLOCK_N": 128, "BLOCK_K": 32},
                         ("N", "group_size"))
    assert seen


if __name__ == "__main__":
    _bf16_like_the_gpu()
    {"paths": paths, "table": table, "tune": tune, "compile": compile_sm90}[sys.argv[1]]()
    print("ok")
