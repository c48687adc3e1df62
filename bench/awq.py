"""AWQ W4A16 on the GPU: the dispatched Triton path against dense fp16 and against dequantize + matmul; and the tuner
that writes the dispatch table (services/llm_decoder/models/awq_configs.json).

Shapes are the linears of Qwen2.5-3B (the LLM of InternVL2_5-4B-AWQ), group 128, random weights, the down projection
gated as served (it takes [gate | up] and computes silu(gate) * up as it loads them), q/k/v with its bias. Every
result is checked against the dequantized weight's matmul within a bound computed from the values (fp32
accumulation, one rounding of the output). Times are per call, calls back to back in a CUDA graph as in a decode
step, each reading its weights from HBM (copies cycled through, more than L2 holds), as in a model's forward, where a
layer's weights are long evicted when it runs again (`timed`).

    python -m bench.awq [--out bench/results/awq-<date>.md]          # on a CUDA machine: the committed table
                                                                     # ($AWQ_CONFIGS: another table file)
    python -m bench.awq --tune services/llm_decoder/models/awq_configs.json [--out ...]
                         # sweep a few configs per (shape, token bucket), write this device class's table, then bench
    TRITON_INTERPRET=1 python -m bench.awq --smoke [--tune /tmp/awq.json]   # CPU: tiny shapes, correctness only

The whole model through the engine, AWQ against bf16: bench/awq_engine.py.
"""
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from bench import kernel_args, kernel_report
from services.common.cuda_graphs import record
from services.common.layers import silu_and_mul
from services.llm_decoder.models import awq
from services.llm_decoder.models import awq_triton as at

# (name, in_features K, out_features N) of one Qwen2.5-3B decoder layer, q/k/v and gate/up fused as served.
SHAPES = [("qkv_proj", 2048, 2560), ("o_proj", 2048, 2048), ("gate_up_proj", 2048, 22016), ("down_proj", 11008, 2048)]
SMOKE_SHAPES = [("tiny", 512, 272)]  # N: ragged for the wide tiles, a multiple of 16 for torch's CPU int4 kernel
TOKENS = [1, 16, 64, 512]
GATED = {"down_proj"}  # as served, the down projection takes [gate | up] and gates it itself
# Qwen2's q/k/v carry a bias (fp16, as AWQ checkpoints store it), which every path adds; the smoke shape too.
BIASED = {"qkv_proj", "tiny"}
# Token counts the tuner measures; each is the top of its bucket, the last bucket holds every larger count.
TUNE_M, SMOKE_TUNE_M = [1, 16, 64, 256, 512, 2048], [1, 16, 48, 130]
GROUP = 128


def error_bound(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x @ w^T in float64, the largest error a correct kernel can have per element): products round at most once
    in fp32 (those of two 16-bit values are exact) and a K-term fp32 sum errs by at most K * 2^-24 * sum|x||w|
    (2^-22 here: tensor cores truncate, and a tile's sums are scaled by their group's scales once more), and the
    output's one rounding by half an ulp."""
    x, w = x.double(), w.double()
    want = x @ w.t()
    unit = torch.finfo(out_dtype).eps / 2
    acc = x.shape[-1] * 2.0 ** -22 * (x.abs() @ w.abs().t())
    return want, unit * want.abs() + (1 + unit) * acc + 2.0 ** -24


def linear_input(x: torch.Tensor, gated: bool) -> tuple[torch.Tensor, float]:
    """(the input a linear multiplies for x, the relative error a kernel's own may differ from it by): a gated linear
    takes [gate | up] and multiplies silu(gate) * up, which the kernels round once and silu_and_mul may round twice
    (eagerly, on the CPU)."""
    return (silu_and_mul(x), 2 * torch.finfo(x.dtype).eps) if gated else (x, 0.0)


def inputs(name: str, m: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor, float, bool]:
    """(x as the linear `name` takes it, its input and that input's error (`linear_input`), gated)."""
    gated = name in GATED
    x = torch.randn(m, 2 * k if gated else k, device=device, dtype=torch.float16)
    return x, *linear_input(x, gated), gated


def operands(q: dict, group: int, cfg: at.Config, x_in: torch.Tensor, x_error: float) -> dict:
    """What a path multiplies for the input x_in (itself within a relative x_error of the path's own, see
    `linear_input`), as `check` takes it: x, the weight [N, K], their relative error beyond that, and where they
    differ from x's, the dtype the product is rounded to before the output's own and the output's. The fused
    kernels compute with the exact (q - z) * scale (fp32 holds it); the dense path with it rounded to x's dtype (as
    awq.dequantize rounds), prefill tiles with the scale in x's dtype times q - z, rounded (the same in fp16, the
    scale rounded first in bf16); torch's int4 kernel with x rounded to bf16 (an x_error may round it to the next
    bf16 value) and awq.int4mm_weight (which the GPU rounds to bf16, each weight by half a bf16 ulp), its sums
    rounded to bf16."""
    if cfg.kernel == "int4mm":
        bf16 = torch.finfo(torch.bfloat16).eps
        w = awq.int4mm_weight(q["qweight"], q["qzeros"], q["scales"], group)
        return {"x": x_in.to(torch.bfloat16), "w": w, "w_error": bf16 / 2 + (bf16 if x_error else 0.0),
                "rounding": torch.bfloat16, "dtype": x_in.dtype}
    if not cfg.rounds_weights:
        return {"x": x_in, "w": awq.dequantize(q["qweight"], q["qzeros"], q["scales"], group, torch.float32),
                "w_error": x_error}
    scales = q["scales"] if cfg.kernel == "dense" else q["scales"].to(x_in.dtype)
    return {"x": x_in, "w": awq.dequantize(q["qweight"], q["qzeros"], scales, group, x_in.dtype), "w_error": x_error}


def check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, what: str, w_error: float = 0.0,
          bias: torch.Tensor | None = None, rounding: torch.dtype | None = None,
          dtype: torch.dtype | None = None) -> float:
    """Assert `got` is of `dtype` (default: x's) and equals x @ w^T (+ bias) within `error_bound`, plus
    w_error * sum|x||w| where `w` is the kernel's weight with each value off by a relative w_error at most (a bias
    adds its own share to the output's rounding; `rounding`: a dtype the product is rounded to first); the largest
    error as a share of its bound."""
    x2 = x.reshape(-1, x.shape[-1])
    want, bound = error_bound(x2, w, rounding or got.dtype)
    bound = bound + w_error * (x2.double().abs() @ w.double().abs().t())
    if rounding is not None:
        bound = bound + torch.finfo(got.dtype).eps / 2 * (want.abs() + bound)  # then rounded to the output's dtype
    if bias is not None:
        want, bound = want + bias.double(), bound + torch.finfo(got.dtype).eps * bias.double().abs()
    err = (got.reshape(want.shape).double() - want).abs()
    share = (err / bound).max().item()
    assert got.dtype == (dtype or x.dtype) and share <= 1, \
        f"{what}: max error {err.max().item():.3g} is {share:.2f}x its bound"
    return share


COLD_BYTES = 256 << 20  # several times any GPU's L2 (50 MB on an H100/H200)
GRAPH_CALLS = 24        # calls per timed graph, at least


def rotation(tensors: tuple, cold: bool = True) -> list[tuple]:
    """`tensors` (a layer's weights) and copies of them, enough that calls cycling through the copies read more than
    COLD_BYTES between two uses of one: each call finds its weights in HBM, as in a model's forward, where a layer's
    weights are long evicted when it runs again. cold=False: the tensors alone (the CPU's smoke runs)."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    copies = max(2, -(-COLD_BYTES // nbytes)) if cold else 1
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(copies - 1)]


def timed(calls: list, repeat: int = 7) -> float:
    """Milliseconds per call on the GPU: `calls` (one per copy of the weights, see `rotation`) cycled GRAPH_CALLS
    times or more back to back in a CUDA graph, as a decode step runs its kernels (no host time between them); the
    median over `repeat` replays. (Single calls between CUDA events after a 256 MB memset, the earlier way, gave
    dense projections of 8-10 MB 10 us on an H200, where reading them takes ~2 us: they timed more than the kernel,
    the memset's dirty lines in L2 among it; and their noise picked the wrong path for o_proj at 512 tokens.)"""
    n = max(GRAPH_CALLS, len(calls))
    graph, _ = record(lambda: [calls[i % len(calls)]() for i in range(n)], None)  # warm-up and capture
    graph.replay()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n)
    return statistics.median(times)


def wall_ms(calls: list) -> float:
    """One call's wall time (the interpreter on the CPU: the tuner's choice there only exercises the code)."""
    start = time.perf_counter()
    calls[0]()
    return (time.perf_counter() - start) * 1e3


# Splits of K may multiply a skinny shape's programs up to this many per SM: a few tokens' tile is bound by the latency
# of its program's K loop (gate_up_proj at one token: 344 programs of 16 steps, under 3 per SM of an H200), so more
# and shorter loops keep more loads and more unpacking in flight.
SKINNY_PROGRAMS_PER_SM = 16
# 16-row tiles unpacked in 16-bit lanes, a tl.dot per nibble slot: wide, so each slot's dot has 32-64 columns for
# the warps to share (narrower ones repeat the work in every warp); 3.9-4.2 sm_90 instructions a weight in the loop
# against 5.3-5.9 for the interleaved 16-row tiles (bench.sass).
LANES = [(16, 256, 128, 4, 3), (16, 512, 64, 4, 3)]


def candidates(m: int, n: int, k: int, sms: int, device: torch.device) -> list[at.Config]:
    """A few tiles per token range; for each, splits of K: up to SKINNY_PROGRAMS_PER_SM programs per SM for a few
    tokens, around the count that gives every SM a program for more. (The split is a runtime argument: the splits
    of a tile share one compiled kernel.) And torch's int4 kernel up to 64 tokens, where it takes the shape."""
    if m == 1:
        # Wide one-token tiles read a k row's words as 128- and 256-byte runs (a 64-column tile reads 32 bytes of
        # each row): longer runs for the memory system, for the same registers (fewer rows per step). Single-stage
        # ones load straight into registers, no cp.async through shared memory: shorter loops on sm_90 (1x64x64
        # slots 421 -> 315 instructions, 1x128x64 458 -> 428) and 0.5-2 KB of shared memory, room for more programs.
        tiles = [(1, 64, 64, 4, 3), (1, 128, 64, 4, 3), (1, 256, 32, 4, 3), (1, 512, 16, 4, 3), (1, 256, 64, 8, 3),
                 (1, 64, 64, 4, 1), (1, 128, 64, 4, 1), (1, 256, 32, 4, 1), (16, 64, 128, 4, 3), LANES[0]]
    elif m <= 16:
        tiles = [(16, 64, 128, 4, 3), (16, 128, 128, 4, 3), *LANES]
    elif m <= 64:
        tiles = [(64, 64, 128, 4, 3), (64, 128, 64, 4, 4)]
    else:
        # Prefill tiles (weights rounded, _rounded_tile): on sm_90 each K step issues fewer instructions than its
        # wgmma take cycles (51-95 %) and keeps its loop in registers (bench/results/sass-awq-2026-12-01-prefill.md).
        tiles = [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3),
                 (256, 128, 64, 8, 3)]
    out = []
    for bm, bn, bk, warps, stages in tiles:
        programs, k_blocks = triton.cdiv(n, bn) * triton.cdiv(m, bm), k // min(bk, GROUP)
        if m <= 16:
            splits = [1]
            while splits[-1] * 2 <= k_blocks and programs * splits[-1] * 2 <= SKINNY_PROGRAMS_PER_SM * sms:
                splits.append(splits[-1] * 2)
        else:
            split = 1
            while programs * split < sms and split * 2 <= k_blocks:
                split *= 2
            splits = [split // 2, split] if split > 1 else [1]
        if bm == 1:
            unpacks = ("interleave", "slots")
        else:
            unpacks = ("lanes",) if (bm, bn, bk, warps, stages) in LANES else ("interleave",)
        out += [at.Config(block=(bm, bn, bk), split=s, warps=warps, stages=stages, unpack=unpack) for s in splits
                for unpack in unpacks]
    if m == 1:
        # In place (a program per group): each nibble masked where it lies, the group's scale after the sum over K;
        # 4.7-5.3 sm_90 instructions a weight in the loop against the interleaved tile's 7.2 (bench.sass).
        out += [at.Config(block=(1, bn, bk), split=k // GROUP, warps=4, stages=stages, unpack="in-place")
                for bn, bk, stages in ((128, 64, 1), (128, 64, 3), (64, 128, 1), (256, 64, 2))]
    if m <= 64 and awq.Int4Pack.supports(n, k, GROUP, device):
        out.append(at.Config(kernel="int4mm"))
    if m >= 64:
        out.append(at.Config(kernel="dense"))
    return out


def int4_packs(packed: list[tuple], n: int, k: int) -> list:
    """Each copy of the weights (`rotation`) in torch's int4 layout too, where its kernel takes the shape (else
    Nones)."""
    device = packed[0][0].device
    if not awq.Int4Pack.supports(n, k, GROUP, device):
        return [None] * len(packed)
    return [awq.Int4Pack(*c, GROUP) for c in packed]


def dump_table(raw: dict) -> str:
    """The table's JSON with one config per line (diffs of a retune read row by row)."""
    lines = ["{"]
    for i, (cls, entry) in enumerate(raw.items()):
        lines += [f"  {json.dumps(cls)}: {{", f'    "source": {json.dumps(entry["source"])},', '    "shapes": [']
        for j, shape in enumerate(entry["shapes"]):
            lines.append(f'      {{"n": {shape["n"]}, "k": {shape["k"]}, "configs": [')
            lines += [f"        {json.dumps(c)}," for c in shape["configs"]]
            lines[-1] = lines[-1].rstrip(",")
            lines.append("      ]}" + ("," if j < len(entry["shapes"]) - 1 else ""))
        lines += ["    ]", "  }" + ("," if i < len(raw) - 1 else "")]
    return "\n".join(lines + ["}"]) + "\n"


def tune(layers: dict, shapes: list, token_counts: list[int], device_name: str, smoke: bool,
         path: Path) -> tuple[dict, list[str]]:
    """Time every candidate on every (shape, token count), keep the fastest that is correct, write this device
    class's table into `path` (other classes kept from it, or from the committed table). The table (JSON structure),
    and the candidates that gave wrong results (a kernel bug, unlike one that does not compile for lack of
    resources)."""
    sms = 132 if smoke else torch.cuda.get_device_properties().multi_processor_count  # smoke: an H100's count
    measure = wall_ms if smoke else timed
    entries, wrong = [], []
    raw = json.loads((path if path.exists() else at.CONFIGS).read_text())
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    source = f"python -m bench.awq --tune on {device_name}, {datetime.date.today()}, {versions}"
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for name, k, n in shapes:
        q, dense = layers[name]
        packed = rotation((q["qweight"], q["qzeros"], q["scales"]), cold=not smoke)
        int4 = int4_packs(packed, n, k)
        configs = []
        for m in token_counts:
            x, x_in, x_error, gated = inputs(name, m, k, dense.device)
            timings = []
            for cfg in candidates(m, n, k, sms, dense.device):
                calls = [lambda c=c, p=p, cfg=cfg: at.awq_gemm(x, *c, GROUP, config=cfg, bias=q.get("bias"),
                                                               gated=gated, int4=p)
                         for c, p in zip(packed, int4)]
                try:
                    check(calls[0](), **operands(q, GROUP, cfg, x_in, x_error), what=f"{name} m={m} {cfg}",
                          bias=q.get("bias"))
                except AssertionError as e:
                    wrong.append(str(e))
                    print(f"  WRONG {e}", flush=True)
                    continue
                except Exception as e:  # e.g. more shared memory than the device has: not a candidate here
                    print(f"  skipped {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                timings.append((measure(calls), cfg))
            if not timings:
                raise SystemExit(f"no candidate ran correctly for {name} m={m}")
            ms, best = min(timings, key=lambda t: t[0])
            # The best of each path, for the record: whether Triton's or torch's kernel won, and by how much.
            paths = {}
            for t, cfg in sorted(timings, key=lambda t: t[0]):
                paths.setdefault(cfg.kernel, t)
            others = "".join(f"; {kernel} {t:.4f} ms" for kernel, t in paths.items() if kernel != best.kernel)
            print(f"tune {name} m={m}: {best} {ms:.4f} ms (best of {len(timings)}{others}; "
                  f"{time.perf_counter() - start:.0f} s in)", flush=True)
            configs.append(best.to_json() | {"max_m": m})
        configs[-1]["max_m"] = None
        # A bucket with the same config as the next one adds nothing.
        configs = [c for c, nxt in zip(configs, configs[1:] + [None])
                   if nxt is None or {**c, "max_m": 0} != {**nxt, "max_m": 0}]
        entries.append({"n": n, "k": k, "configs": configs})
        # After every shape: a run cut short by its time limit keeps what it tuned.
        raw[at.device_class(device_name)] = {"source": source, "shapes": entries}
        path.write_text(dump_table(raw))
    print(f"wrote {path}", flush=True)
    return raw, wrong


def main() -> None:
    args, device, device_name = kernel_args(__doc__, "tune first, write the table there, bench with it")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    torch.manual_seed(0)
    layers = {}
    for name, k, n in shapes:
        q = {key: t.to(device) for key, t in awq.quantize(torch.randn(n, k) * 0.02, GROUP).items()}
        if name in BIASED:
            q["bias"] = (torch.randn(n) * 0.1).half().to(device)
        layers[name] = q, awq.dequantize(q["qweight"], q["qzeros"], q["scales"], GROUP, torch.float16)
    wrong = []
    if args.tune:
        raw, wrong = tune(layers, shapes, SMOKE_TUNE_M if args.smoke else TUNE_M, device_name, args.smoke, args.tune)
    else:
        raw = json.loads(at.table_path().read_text())  # the committed table, or $AWQ_CONFIGS
    table, source = at.parse_table(raw), raw.get(at.device_class(device_name), raw["default"])["source"]

    rows, report = [], ["| linear | K | N | tokens | path | config | error / bound | dense fp16 ms | ours ms "
                        "| dequantize+matmul ms | dense / ours | ours TB/s |", "|---" * 12 + "|"]
    for name, k, n in shapes:
        q, dense = layers[name]
        dense_path = at.Config(kernel="dense")
        packed = rotation((q["qweight"], q["qzeros"], q["scales"]), cold=not args.smoke)
        int4 = int4_packs(packed, n, k)
        if not args.smoke:
            dense_copies = rotation((dense,))
        # Smoke: the lowest token count of each bucket of the table, so every config it holds for the shape runs.
        buckets = at.shape_configs(table, device_name, n, k)
        tokens = [1] + [c.max_m + 1 for c in buckets[:-1]] if args.smoke else TOKENS
        for m in tokens:
            x, x_in, x_error, gated = inputs(name, m, k, device)
            cfg = at.select(table, device_name, n, k, m)
            bias = q.get("bias")

            def ours(c, p=None, config=cfg):  # the layer as served, on weight copy c (p: its Int4Pack)
                return at.awq_gemm(x, *c, GROUP, config=config, bias=bias, gated=gated, int4=p)

            share = check(ours(packed[0], int4[0]), **operands(q, GROUP, cfg, x_in, x_error),
                          what=f"{name} m={m} {cfg}", bias=bias)
            row = {"linear": name + " (gated)" * gated + " (bias)" * (bias is not None), "k": k, "n": n, "tokens": m,
                   "path": cfg.path, "config": str(cfg), "error_share": share}
            if not args.smoke:
                # Dense as served: a gated input through the compiled silu_and_mul kernel first.
                row["dense_ms"] = timed([lambda c=c: F.linear(silu_and_mul(x) if gated else x, *c, bias)
                                         for c in dense_copies])
                row["ours_ms"] = timed([lambda c=c, p=p: ours(c, p) for c, p in zip(packed, int4)])
                row["dequant_ms"] = timed([lambda c=c: ours(c, config=dense_path) for c in packed])
                row["dense_over_ours"] = row["dense_ms"] / row["ours_ms"]
                # What the memory bound is about: the packed weight, its zeros and scales, x and the output.
                nbytes = sum(t.numel() * t.element_size() for t in (*packed[0], x)) + m * n * x.element_size()
                row["ours_tb_s"] = nbytes / row["ours_ms"] / 1e9
            rows.append(row)
            times = (" | ".join(f"{row[key]:.4f}" for key in ("dense_ms", "ours_ms", "dequant_ms"))
                     + f" | {row['dense_over_ours']:.2f} | {row['ours_tb_s']:.2f}" if not args.smoke
                     else "- | - | - | - | -")
            report.append(f"| {row['linear']} | {k} | {n} | {m} | {cfg.path} | {cfg} | {share:.2f} | {times} |")
    header = (f"# AWQ W4A16 GEMM\n\ndevice: {'CPU (Triton interpreter, smoke)' if args.smoke else device_name}; "
              f"date: {datetime.date.today()}; torch {torch.__version__}; triton {triton.__version__}; "
              f"command: `python -m bench.awq {' '.join(sys.argv[1:])}`; table: {source}\n\n")
    kernel_report(args.out, header + "\n".join(report) + "\n", {"device": device_name, "rows": rows}, wrong)


if __name__ == "__main__":
    main()
