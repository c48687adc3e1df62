"""One token's dense projections on the GPU: the Triton GEMV (services/common/gemv.py) against cuBLAS (F.linear) in
the same run, and the tuner that writes the kernel table (services/common/gemv_configs.json).

Shapes: every projection of the served LLMs at one token (q/k/v and gate/up fused, the head's rows padded to 64),
bf16, random weights; the down projection gated as served (the kernel computes silu(gate) * up from the gate/up
output; cuBLAS gets it from the compiled silu_and_mul kernel, timed with it). Each candidate is checked against
float64 within the bound of fp32 accumulation and one output rounding (bench.awq.error_bound), and timed as bench.awq
times (back to back in a CUDA graph, weights from HBM). A shape enters the table only when its best candidate beats
cuBLAS by at least MARGIN in this run; the others stay cuBLAS.

    python -m bench.gemv [--out bench/results/gemv-<date>.md]      # on a CUDA machine: the table in use
    python -m bench.gemv --tune services/common/gemv_configs.json [--out ...]   # sweep, write this class's table
    TRITON_INTERPRET=1 python -m bench.gemv --smoke [--tune /tmp/gemv.json]  # CPU: tiny shapes, correctness only
"""
import datetime
import json
import sys

import torch
import torch.nn.functional as F
import triton

from bench import kernel_args, kernel_report
from bench.awq import check, linear_input, rotation, timed, wall_ms
from bench.decoder import SHAPES
from services.common import gemv as gv
from services.common.kernel_tables import device_class, table_file
from services.common.layers import silu_and_mul
from services.llm_decoder.models.llama import PaddedRows

MARGIN = 0.97  # a shape takes the kernel when it runs in at most this share of cuBLAS's time


def served_shapes() -> list[tuple[str, int, int, bool]]:
    """(name, K, N, gated) of every one-token projection of the served LLMs, once each; gated: the down projection,
    whose input is silu_and_mul of the gate/up projection's output (the GEMV computes it, cuBLAS needs its kernel)."""
    out = {}
    for model, s in SHAPES.items():
        if model == "tiny":
            continue
        d = s.hidden // s.heads
        for name, k, n in (("qkv_proj", s.hidden, (s.heads + 2 * s.kv_heads) * d), ("o_proj", s.heads * d, s.hidden),
                           ("gate_up_proj", s.hidden, 2 * s.inter), ("down_proj", s.inter, s.hidden),
                           ("lm_head", s.hidden, PaddedRows.padded(s.vocab))):
            out.setdefault((k, n), f"{model}.{name}")
    return [(name, k, n, name.endswith("down_proj")) for (k, n), name in out.items()]


# Odd sizes: rows that do not fill a tile, K that does not fill a step, a bias, and a gated input.
SMOKE_SHAPES = [("tiny", 96, 72, False), ("tiny_k", 200, 40, False), ("tiny_down", 72, 40, True)]


def candidates(smoke: bool) -> list[gv.Config]:
    if smoke:
        return [gv.Config(16, 64, 4, 2), gv.Config(8, 128, 4, 3), gv.Config(4, 64, 2, 2), gv.Config(8, 64, 4, 1)]
    # Down to 4 rows a program: the 1B model's 896-row projections need that to give every SM of an H200 a program.
    # Stages 3 and 5 stream the weights through shared memory (cp.async); one stage loads them straight into
    # registers (128-bit loads, a 126-instruction loop for 16x256 against 145, 0.5 KB of shared memory against 17 KB:
    # many more programs per SM hide the latency instead).
    return [gv.Config(bn, bk, warps, stages) for bn in (4, 8, 16, 32) for bk in (256, 512) for warps in (4, 8)
            for stages in (3, 5)] + [gv.Config(bn, bk, 4, 1) for bn in (4, 8, 16, 32) for bk in (256, 512)]


def main() -> None:
    args, device, device_name = kernel_args(__doc__, "sweep the candidates, write this device class's table")
    # The interpreter keeps bf16 as raw bits and truncates where the GPU rounds: the smoke run checks fp16 and fp32.
    dtypes = [torch.float16, torch.float32] if args.smoke else [torch.bfloat16]
    measure = wall_ms if args.smoke else timed
    table_path = table_file(gv.CONFIGS, "GEMV_CONFIGS")
    table = gv.parse_table(json.loads(table_path.read_text()))
    chosen = table.get(device_class(device_name), {})
    torch.manual_seed(0)
    rows, tuned, wrong = [], [], []
    report = ["| linear | K | N | dtype | cuBLAS ms | cuBLAS TB/s | best kernel | kernel ms | kernel TB/s | "
              "cuBLAS / kernel | table |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    source = f"the table in use ({table_path})"
    if args.tune:
        source = (f"python -m bench.gemv --tune on {device_name}, {datetime.date.today()}, torch {torch.__version__}, "
                  f"triton {triton.__version__}")
        raw = json.loads((args.tune if args.tune.exists() else gv.CONFIGS).read_text())  # other classes kept
        args.tune.parent.mkdir(parents=True, exist_ok=True)
    for name, k, n, gated in SMOKE_SHAPES if args.smoke else served_shapes():
        for dtype in dtypes:
            w = (torch.randn(n, k, device=device) * k ** -0.5).to(dtype)
            bias = torch.randn(n, device=device).to(dtype) if name == "tiny" else None
            x = torch.randn(1, 2 * k if gated else k, device=device).to(dtype)
            x_in, x_error = linear_input(x, gated)
            weights = rotation((w,), cold=not args.smoke)
            # cuBLAS as served: a gated input through its own (compiled) silu_and_mul kernel first. The best of three:
            # one wall-clock call on a busy CPU (the smoke run) may take milliseconds longer, or warm something up.
            dense = [lambda c=c: F.linear(silu_and_mul(x) if gated else x, *c, bias) for c in weights]
            dense_ms = min(measure(dense) for _ in range(3))
            timings = []
            for cfg in candidates(args.smoke) if args.tune or args.smoke else [chosen.get((n, k))]:
                if cfg is None:
                    continue
                calls = [lambda c=c, cfg=cfg: gv.gemv(x, *c, bias, cfg, gated) for c in weights]
                try:
                    check(calls[0](), x_in, w, f"{name} {dtype} {cfg}", x_error, bias)
                except AssertionError as e:
                    wrong.append(str(e))
                    print(f"  WRONG {e}", flush=True)
                    continue
                timings.append((measure(calls), cfg))
            best_ms, best = min(timings, key=lambda t: t[0]) if timings else (float("nan"), None)
            in_table = best is not None and (best_ms <= MARGIN * dense_ms if args.tune else not args.smoke)
            if args.tune and in_table:
                tuned.append({"n": n, "k": k, **vars(best)})
            gb = (n * k + k + n) * w.element_size() / 1e9
            row = {"linear": name + " (gated)" * gated, "k": k, "n": n, "dtype": str(dtype).removeprefix("torch."),
                   "cublas_ms": dense_ms, "kernel": str(best) if best else "-", "kernel_ms": best_ms,
                   "in_table": in_table}
            rows.append(row)
            report.append(f"| {row['linear']} | {k} | {n} | {row['dtype']} | {dense_ms:.4f} | {gb / dense_ms:.2f} | "
                          f"{row['kernel']} | {best_ms:.4f} | {gb / best_ms:.2f} | {dense_ms / best_ms:.2f} | "
                          f"{'kernel' if row['in_table'] else 'cuBLAS'} |")
            print(report[-1], flush=True)
        if args.tune:  # after every shape: a run cut short by its time limit keeps what it tuned
            raw[device_class(device_name)] = {"source": source, "shapes": tuned}
            args.tune.write_text(json.dumps(raw, indent=2) + "\n")
    if args.tune:
        print(f"wrote {args.tune}: {len(tuned)} shape(s) take the kernel", flush=True)
    header = (f"# One-token projections: Triton GEMV vs cuBLAS\n\ndevice: "
              f"{'CPU (Triton interpreter, smoke)' if args.smoke else device_name}; date: {datetime.date.today()}; "
              f"torch {torch.__version__}; triton {triton.__version__}; command: `python -m bench.gemv "
              f"{' '.join(sys.argv[1:])}`; table: {source}\n\nTB/s: weight, input and output bytes / time (the HBM "
              "limit of an H200: 4.8). table: what serving runs for that shape.\n\n")
    kernel_report(args.out, header + "\n".join(report) + "\n", {"device": device_name, "rows": rows}, wrong)


if __name__ == "__main__":
    main()
