"""AWQ W4A16 against bf16 through the decoder engine: the whole LLM at InternVL2_5-4B's shapes, in the same run.

One serving model at the chosen shape (default qwen2_5_3b: Qwen2.5-3B, the LLM of InternVL2_5-4B) gets random weights
on the device (bench.decoder's spread). Every linear of its decoder layers is quantized with `awq.quantize` (asymmetric
uint4, --group-size 128, fp16 scales) into a second model of the same config built with AWQ linears, and the
dequantized weights are written back into the first. The two are then the same model: equal embedding table, norms,
unquantized head and biases (rounded through fp16, as AWQ checkpoints store them), and each dense weight is the AWQ
weight rounded once to the model dtype (awq.dequantize's rounding). What differs is the bytes a step reads and the order
products are summed in, and on CUDA the dtype: the AWQ model runs in fp16, as the decoder serves an AWQ checkpoint
(--awq-dtype), the dense one in bf16 (--dtype); and the fused W4A16 kernels compute with the exact weights, where the
dense model holds them rounded.

For each stream count (--streams): random prompts of --prompt-len tokens, --new-tokens greedy tokens per stream, EOS
ignored, both engines on the same prompts after a warm-up; fresh prompts for every run (the prefix cache never serves
one); --repeat N reports the median run of each. Measured:

1. tok/s of each (generated tokens of all streams / wall time, prefill included) and AWQ / dense. Issue #19's target:
   AWQ >= 1.5x the bf16 model's tok/s at 1 stream on the GPU (reported, not enforced).
2. Decode ms/step of each (after every stream's first token) and, on CUDA, the share of the HBM limit: bytes a step
   reads (every weight but the embedding table: packed nibbles, zeros and scales, biases, norms, the 16-bit head; plus
   the KV cache at mid-generation) / step time / --hbm-bandwidth.
3. Greedy agreement: leading tokens both models share. On the CPU the AWQ linears run on their dequantized weight, so
   in fp32 both must give identical tokens on every stream (else exit status 1); on the GPU (W4A16 kernels against
   bf16 matmuls, other summation orders) it is only reported.

On CUDA the AWQ linears dispatch by the table in use (services/llm_decoder/models/awq_configs.json, or the file
$AWQ_CONFIGS names, as bench/gpu.sh does with the table it has just tuned); CUDA graphs are on, as the engine serves.

    python -m bench.awq_engine --out bench/results/awq-engine-h200.md      # CUDA: qwen2_5_3b, bf16 vs AWQ fp16,
                                                                           # 1 and 16 streams
    AWQ_CONFIGS=/tmp/awq_configs.json python -m bench.awq_engine           # with another dispatch table
    python -m bench.awq_engine --device cpu --smoke --out /tmp/awq-engine.md  # tiny shapes, fp32, seconds (tested)

The markdown report goes to --out and the same numbers as JSON next to it. Needs only torch (and Triton on CUDA).
"""
import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from bench import save, sync
from bench.decoder import (ROOT, SHAPES, agreement, build_engine_model, decode_step_ms, device_name, hbm_fraction,
                           kv_bytes_per_token, make_engine, median_run, random_prompts, randomize_, run_engine, table,
                           weight_bytes_per_step)
from services.common.weights import torch_dtype
from services.llm_decoder.models import awq
from services.llm_decoder.models.awq import AWQLinear

TARGET = 1.5    # issue #19: AWQ / bf16 tok/s at 1 stream, on the GPU
SHOWN = 16      # leading greedy tokens of stream 0 shown in the report
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@torch.no_grad()
def quantize_into(dense: torch.nn.Module, quant: torch.nn.Module, group_size: int) -> float:
    """Quantize each linear of `dense` that is an AWQLinear in `quant` (the same config with awq_group_size) into it,
    copy every other parameter, and write the dequantized weights back into `dense`; biases become fp16-rounded in
    both. Every parameter of `quant` is filled. Returns the relative RMS change quantization made to those weights."""
    params, filled, err, norm = dict(dense.named_parameters()), set(), 0.0, 0.0
    for name, layer in quant.named_modules():
        if not isinstance(layer, AWQLinear):
            continue
        src = dense.get_submodule(name)
        packed = awq.quantize(src.weight, group_size)
        for key, tensor in packed.items():
            getattr(layer, key).copy_(tensor)
        deq = awq.dequantize(packed["qweight"], packed["qzeros"], packed["scales"], group_size, torch.float32)
        err += (deq - src.weight.float()).square().sum().item()
        norm += src.weight.float().square().sum().item()
        src.weight.copy_(deq)  # one rounding from the exact fp32 value, as dequantize(..., dtype) rounds
        if layer.bias is not None:
            layer.bias.copy_(src.bias)
            src.bias.copy_(layer.bias)
        filled.update(f"{name}.{key}" for key, _ in layer.named_parameters())
    for name, p in quant.named_parameters():
        if name not in filled:
            p.copy_(params[name])
    return (err / norm) ** 0.5


def awq_path(device: str, quant: torch.nn.Module, tokens: list[int]) -> dict:
    """What the AWQ linears run on `device`."""
    if not device.startswith("cuda"):
        return {"kernel": "CPU: each AWQ linear dequantized once, then torch's matmul"}
    if awq.awq_gemm is None:
        return {"kernel": "no Triton: dequantized on every call (not the served path)"}
    return dispatch(quant, torch.cuda.get_device_name(device), tokens)


def dispatch(quant: torch.nn.Module, gpu: str, tokens: list[int]) -> dict:
    """The table in use (awq_triton.table_path()) and the config it gives each linear of a layer on `gpu` for each
    token count."""
    from services.llm_decoder.models import awq_triton as at

    path = at.table_path()
    raw = json.loads(path.read_text())
    cls = at.device_class(gpu) if at.device_class(gpu) in raw else "default"
    layers = [(n.rpartition(".")[2], m) for n, m in quant.model.layers[0].named_modules() if isinstance(m, AWQLinear)]
    int4 = sum(m.int4 is not None for m in quant.modules() if isinstance(m, AWQLinear))
    return {"kernel": f"W4A16 by the table (Triton; torch's int4mm: {int4} linears packed for it)",
            "table": f"{path.name}, {cls}: {raw[cls]['source']}",
            "dispatch": {m: {name: str(at.pick_config(gpu, layer.out_features, layer.in_features, m))
                             for name, layer in layers} for m in tokens}}


def measure(engines: dict, vocab: int, streams: int, args) -> dict:
    """Both engines on the same prompts: a warm-up, then --repeat runs of fresh prompts, which engine goes first
    alternating; the median run of each."""
    warm = random_prompts(streams, args.prompt_len, vocab, args.seed)
    for name, engine in engines.items():
        run_engine(engine, warm, min(4, args.new_tokens), args.device, f"warm{streams}-{name}")
    runs, hits = {name: [] for name in engines}, 0
    for r in range(args.repeat):
        prompts = random_prompts(streams, args.prompt_len, vocab, args.seed)
        for name, engine in list(engines.items())[::-1 if r % 2 else 1]:
            before = engine.scheduler.cached_tokens
            runs[name].append(run_engine(engine, prompts, args.new_tokens, args.device, f"{name}{streams}-{r}"))
            hits += engine.scheduler.cached_tokens - before
    row = {"streams": streams, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeat": args.repeat,
           "prefix_cache_hit_tokens": hits}
    for name, model_runs in runs.items():
        run = median_run(model_runs)
        tokens = sum(map(len, run["outputs"]))
        row |= {f"{name}_tokens": tokens, f"{name}_s": run["s"], f"{name}_tok_s": tokens / run["s"],
                f"{name}_prefill_s": run["prefill_s"], f"{name}_step_ms": decode_step_ms(run, args.new_tokens),
                f"{name}_first_tokens": model_runs[0]["outputs"][0][:SHOWN]}
    agree = [agreement(a, b) for d, q in zip(runs["dense"], runs["awq"]) for a, b in zip(d["outputs"], q["outputs"])]
    row |= {"ratio": row["awq_tok_s"] / row["dense_tok_s"], "step_ratio": row["dense_step_ms"] / row["awq_step_ms"],
            "agree_min": min(agree), "identical": sum(a == args.new_tokens for a in agree), "compared": len(agree)}
    return row


# ------------------------------------------------------------------------------------------------------ report

def columns(dense: str) -> tuple[list, list]:
    tp = [("streams", "streams", 0), ("awq_tokens", "tokens", 0), ("dense_tok_s", f"{dense} tok/s", 1),
          ("awq_tok_s", "AWQ tok/s", 1), ("ratio", f"AWQ/{dense}", 2), ("dense_prefill_s", f"{dense} prefill s", 3),
          ("awq_prefill_s", "AWQ prefill s", 3), ("dense_step_ms", f"{dense} decode ms/step", 2),
          ("awq_step_ms", "AWQ decode ms/step", 2), ("step_ratio", "decode step ratio", 2),
          ("agree_min", "greedy agreement (min over streams)", 0), ("identical_of", "identical streams", 0)]
    hbm = [("streams", "streams", 0), ("dense_gb", f"{dense} GB / step", 3), ("dense_step_ms", f"{dense} ms/step", 2),
           ("dense_hbm_pct", f"{dense} % of HBM limit", 1), ("awq_gb", "AWQ GB / step", 3),
           ("awq_step_ms", "AWQ ms/step", 2), ("awq_hbm_pct", "AWQ % of HBM limit", 1)]
    return tp, hbm


def report(result: dict) -> str:
    m, dense = result["meta"], SHORT[result["meta"]["dtype"]]
    tp_cols, hbm_cols = columns(dense)
    path, awq_dtype = m["awq_path"], SHORT[m.get("awq_dtype", m["dtype"])]
    lines = [f"# AWQ W4A16 ({awq_dtype}) vs {dense} through the engine ({m['shape']}, {m['device']})", "",
             f"- date: {m['date']}", f"- device: {m['device_name']}", f"- command: `{m['command']}`",
             f"- weights: random, {m['params_m']:.1f}M parameters; decoder-layer linears quantized to 4 bits, group "
             f"{m['group_size']} (relative RMS change {m['weight_rel_rms']:.3f}); the {dense} model holds the "
             "dequantized weights, so both are the same model up to summation order"
             + (f" and rounding (AWQ computes in {awq_dtype}, as it is served)" if awq_dtype != dense else ""),
             f"- bytes a decode step reads (weights, embedding table excluded): {dense} "
             f"{m['dense_weight_bytes'] / 1e6:.1f} MB, AWQ {m['awq_weight_bytes'] / 1e6:.1f} MB",
             f"- AWQ linears: {path['kernel']}" + (f"; table {path['table']}" if "table" in path else "")]
    for tokens, configs in path.get("dispatch", {}).items():
        lines.append(f"- dispatch at {tokens} token(s): " + ", ".join(f"{k} {v}" for k, v in configs.items()))
    rows = result.get("throughput", [])
    if rows:
        shown = [r | {"identical_of": f"{r['identical']}/{r['compared']}"} for r in rows]
        lines += ["", f"## Throughput: prompt {rows[0]['prompt_len']} tokens, {rows[0]['new_tokens']} new tokens per "
                  "stream (greedy, EOS ignored)", ""] + table(tp_cols, shown)
        lines += ["", f"tok/s: generated tokens of all streams / wall time (prefill included); AWQ/{dense} > 1: AWQ is "
                  "faster. Both engines: all streams added at once, stepped to completion (on CUDA with CUDA "
                  "graphs, as served). "
                  "Prefill s: until every stream has its first token; decode ms/step: after it; decode step ratio: "
                  f"{dense} / AWQ. Agreement: leading greedy tokens equal in both; identical streams: of every "
                  f"measured (run, stream). Same fresh random prompts for both; median of {rows[0]['repeat']} run(s).",
                  ""]
        if hits := sum(r["prefix_cache_hit_tokens"] for r in rows):
            lines += [f"WARNING: the prefix cache served {hits} prompt tokens of the measured runs.", ""]
        if any("awq_bytes" in r for r in rows):
            hbm = [r | {f"{k}_gb": r[f"{k}_bytes"] / 1e9 for k in ("dense", "awq")}
                   | {f"{k}_hbm_pct": 100 * r[f"{k}_hbm_fraction"] for k in ("dense", "awq")} for r in rows]
            lines += [f"### Fraction of the HBM limit ({m['hbm_bandwidth'] / 1e12:.2f} TB/s)", ""]
            lines += table(hbm_cols, hbm)
            lines += ["", "Bytes per decode step: every weight but the embedding table, plus the streams' KV cache at "
                      "mid-generation; / decode step time / the bandwidth.", ""]
    if t := result.get("target"):
        lines += ["## Issue #19 target", "",
                  f"1 stream: AWQ {t['ratio']:.2f}x the {dense} model's tok/s (target >= {TARGET}: "
                  f"{'met' if t['met'] else 'NOT met'}).", ""]
    if c := result.get("correctness"):
        lines += ["## Greedy agreement (1 stream, first run)", "", c["verdict"],
                  f"{dense}: {c['dense']}", f"AWQ: {c['awq']}", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main

GPU_DEFAULTS = dict(shape="qwen2_5_3b", dtype="bfloat16", group_size=128, streams=[1, 16], prompt_len=128,
                    new_tokens=128, repeat=3)
SMOKE = dict(shape="tiny", dtype="float32", group_size=32, streams=[1, 2], prompt_len=32, new_tokens=16, repeat=1)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.awq_engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the H200 run) or cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, 1-2 streams, 16 tokens, group 32")
    p.add_argument("--shape", choices=sorted(SHAPES), help="default qwen2_5_3b (smoke: tiny)")
    p.add_argument("--dtype", choices=sorted(SHORT), help="of the dense model and the activations (cuda: bfloat16, "
                   "cpu: float32)")
    p.add_argument("--awq-dtype", choices=sorted(SHORT) + ["auto"], default="auto",
                   help="of the AWQ model and its activations (auto: as the decoder's --dtype auto serves an AWQ "
                   "checkpoint, float16 on CUDA, float32 on the CPU)")
    p.add_argument("--group-size", type=int, help="AWQ group size (128; smoke: 32, the tiny checkpoint's)")
    p.add_argument("--streams", type=int, nargs="+", help="stream counts (1 16; smoke: 1 2)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens per stream (128; smoke: 32)")
    p.add_argument("--new-tokens", type=int, help="greedy tokens per stream (128; smoke: 16)")
    p.add_argument("--repeat", type=int, help="measured runs per stream count, the median reported (3; smoke: 1)")
    p.add_argument("--hbm-bandwidth", type=float, default=4.8e12, help="B/s (H200: 4.8e12)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="markdown report, the JSON beside it "
                   "(default: bench/results/awq-engine-<device>-<date>.md)")
    args = p.parse_args()
    defaults = SMOKE if args.smoke else GPU_DEFAULTS | ({} if args.device.startswith("cuda") else {"dtype": "float32"})
    vars(args).update({key: value for key, value in defaults.items() if getattr(args, key) is None})
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2")
    args.max_running = max(args.streams)
    args.out = Path(args.out or ROOT / "bench" / "results" /
                    f"awq-engine-{args.device.split(':')[0]}-{datetime.date.today().isoformat()}.md")
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    args = parse_args()
    shape, dtype = SHAPES[args.shape], getattr(torch, args.dtype)
    awq_dtype = torch_dtype(args.awq_dtype, args.device, awq=True)
    args.awq_dtype = str(awq_dtype).removeprefix("torch.")
    dtypes = {"dense": dtype, "awq": awq_dtype}
    torch.manual_seed(args.seed)

    log(f"building {args.shape} ({args.dtype}; AWQ {args.awq_dtype}) on {args.device}, quantizing (group "
        f"{args.group_size})")
    start = time.perf_counter()
    dense = build_engine_model(shape, args.device, dtype)
    randomize_(dense, args.seed)
    quant = build_engine_model(shape, args.device, awq_dtype, args.group_size)
    rel = quantize_into(dense, quant, args.group_size)
    awq.prepare(quant)  # as the decoder does once the weights are loaded
    sync(args.device)
    built_s = time.perf_counter() - start
    models = {"dense": dense, "awq": quant}
    weight_bytes = {name: weight_bytes_per_step(model) for name, model in models.items()}
    result = {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": args.device,
                       "device_name": device_name(args.device), "shape": args.shape, "dtype": args.dtype,
                       "awq_dtype": args.awq_dtype,
                       "group_size": args.group_size, "weight_rel_rms": rel, "build_s": built_s,
                       "command": shlex.join(["python", "-m", "bench.awq_engine", *sys.argv[1:]]),
                       "params_m": sum(p.numel() for p in dense.parameters()) / 1e6,
                       "dense_weight_bytes": weight_bytes["dense"], "awq_weight_bytes": weight_bytes["awq"],
                       "awq_path": awq_path(args.device, quant, sorted({1, max(args.streams)})),
                       "hbm_bandwidth": args.hbm_bandwidth, "args": vars(args) | {"out": str(args.out)}}}
    log(f"built in {built_s:.1f} s; starting both engines" + (" (CUDA graphs)" if args.device.startswith("cuda") else ""))
    # KV blocks: every stream's prompt and output, one spare block per sequence, and a margin.
    need = max(args.streams) * (args.prompt_len + args.new_tokens)
    num_blocks = -(-need // args.block_size) + max(args.streams) + 16
    engines = {name: make_engine(model, num_blocks, args, dtypes[name]) for name, model in models.items()}

    result["throughput"] = []
    for streams in args.streams:
        log(f"throughput: {streams} streams x ({args.prompt_len} + {args.new_tokens}) tokens")
        row = measure(engines, shape.vocab, streams, args)
        if args.device.startswith("cuda"):
            for name in models:
                kv = streams * (args.prompt_len + args.new_tokens // 2) * kv_bytes_per_token(shape, dtypes[name])
                row[f"{name}_bytes"] = weight_bytes[name] + kv
                row[f"{name}_hbm_fraction"] = hbm_fraction(row[f"{name}_bytes"], row[f"{name}_step_ms"],
                                                           args.hbm_bandwidth)
        result["throughput"].append(row)
        log(f"  {SHORT[args.dtype]} {row['dense_tok_s']:.1f} tok/s, AWQ {row['awq_tok_s']:.1f} tok/s, ratio "
            f"{row['ratio']:.2f}; decode {row['dense_step_ms']:.2f} / {row['awq_step_ms']:.2f} ms/step; identical "
            f"streams {row['identical']}/{row['compared']}")
        save(args.out, report(result), result)

    rows = result["throughput"]
    strict = args.device == "cpu" and dtype == awq_dtype == torch.float32
    identical = all(r["identical"] == r["compared"] for r in rows)
    one = next((r for r in rows if r["streams"] == 1), rows[0])
    verdict = (f"{one['agree_min']} of {args.new_tokens} leading tokens equal at 1 stream; identical streams: "
               f"{sum(r['identical'] for r in rows)} of {sum(r['compared'] for r in rows)}")
    verdict += (f" (fp32 on the CPU, AWQ on its dequantized weight: all required identical: "
                f"{'pass' if identical else 'FAIL'})" if strict
                else f" ({args.dtype} / AWQ {args.awq_dtype} on {args.device}: reported only)")
    result["correctness"] = {"verdict": verdict, "passed": identical or not strict, "dense": one["dense_first_tokens"],
                             "awq": one["awq_first_tokens"]}
    if args.device.startswith("cuda") and one["streams"] == 1:
        result["target"] = {"ratio": one["ratio"], "target": TARGET, "met": one["ratio"] >= TARGET}
    save(args.out, report(result), result)
    print(report(result))
    print(f"written to {args.out} and {args.out.with_suffix('.json')}", file=sys.stderr)
    if not result["correctness"]["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
