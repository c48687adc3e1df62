"""Each seed family at its real shapes (random bf16 weights) through the services: load time, GPU memory, latency.

For every family: write the random checkpoint (`tools.make_tiny_checkpoint --size real`, on the device), start the
stack (`tools.run_local.start_stack`), send one warm-up and one measured streaming chat request (a noise image and a
short question, greedy), read each service's load time from its log and its GPU memory, stop the stack and delete the
checkpoint. The markdown table is rewritten after every family (a run cut short keeps what it measured) and printed.

    python -m bench.families --device cuda                                   # all five, original layout
    python -m bench.families --size tiny --device cpu --families internvl2_5 internvl2 --out /tmp/fam.md

GPU memory per service: nvidia-smi's per-process figure (CUDA context included) when it lists the service's PID,
else the service's `*_gpu_memory_bytes` gauge (torch's reserved memory, no context; marked *), as sandboxes often
hide other processes from nvidia-smi.
"""
import argparse
import base64
import datetime
import io
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from tools.make_tiny_checkpoint import CHECKPOINTS, NAMES, SIZES
from tools.run_local import ROOT, Stack, service_threads, start_stack

QUESTION = "Describe the image in detail."


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def noise_png(width: int, height: int, seed: int) -> str:
    buf = io.BytesIO()
    noise_image(width, height, seed).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(stack: Stack, model: str, image: str, max_num: int, max_tokens: int, system: str | None = None) -> dict:
    """One streaming greedy request; time to the first generated token and to the end, and the usage. A `system`
    prompt changes the prompt from its first token: nothing of an earlier request's KV cache is reused."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "max_num": max_num, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                      {"type": "text", "text": QUESTION}]}]}
    if system:
        body["messages"].insert(0, {"role": "system", "content": system})
    req = urllib.request.Request(stack.gateway_url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    start, first, usage = time.perf_counter(), None, {}
    with urllib.request.urlopen(req, timeout=600) as r:
        # The gateway's split of the time to the first token: "fetch;dur=1.2, preprocess;dur=30.5, ..." (ms).
        split = {k: float(v) for k, v in (part.split(";dur=") for part in r.headers["Server-Timing"].split(", "))}
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"request failed: {event['error']}")
            # The first chunk only carries the role; token ids mark the first generated token.
            if first is None and any(c.get("token_ids") for c in event["choices"]):
                first = time.perf_counter()
            usage = event.get("usage") or usage
    end = time.perf_counter()
    return {"ttft_ms": 1000 * ((first or end) - start), "total_ms": 1000 * (end - start), "split": split, **usage}


def smi(*query: str) -> list[list[str]]:
    """nvidia-smi CSV rows ([] where there is no nvidia-smi)."""
    try:
        out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [[f.strip() for f in line.split(",")] for line in out.strip().splitlines() if line.strip()]


def gauge(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as r:
        m = re.search(rf"^{name} (\S+)$", r.read().decode(), re.M)
    return float(m[1]) if m else 0.0


def gpu_mib(stack: Stack, device: str) -> dict[str, str]:
    if not device.startswith("cuda"):
        return {"vision": "n/a", "decoder": "n/a"}
    rows = smi("--query-compute-apps=pid,used_memory")  # may be empty, or "[N/A]", inside a sandbox
    by_pid = {int(r[0]): int(r[1]) for r in rows if len(r) == 2 and r[0].isdigit() and r[1].isdigit()}
    out = {}
    for key, proc, url in (("vision", "vision_encoder", stack.vision_metrics_url),
                           ("decoder", "llm_decoder", stack.decoder_metrics_url)):
        pid = stack.procs[proc].pid
        if pid in by_pid:
            out[key] = by_pid[pid]
        else:
            out[key] = f"{gauge(url, f'{key}_gpu_memory_bytes') / 2 ** 20:.0f}*"
    return out


def load_times(log: Path) -> dict[str, str]:
    """The services' own load times (weights read and on the device), from their log lines."""
    text = log.read_text(errors="replace")
    found = {}
    for key, what in (("vision", "vision"), ("decoder", "language")):
        m = re.search(rf"{what} model loaded in ([\d.]+)s \(([^,]+), (?:torch\.)?(\w+)\)", text)
        found[key], found[key + "_dtype"] = (m[1], m[3]) if m else ("?", "?")
    return found


def compute_baseline(args) -> None:
    """(A child process, --baseline-of CKPT.) What the measured request's time to first token is held against: the
    vision model's forward pass over its tiles and the engine's prefill of its prompt, in-process, each built as its
    service builds it (the services' own settings and defaults, the same environment). Prints one JSON line."""
    import torch

    from bench.decoder import new_sequence, until_first_token
    from bench.vision import timed
    from services.common import weights
    from services.gateway.tiling import tile_image
    from services.llm_decoder import __main__ as decoder_main
    from services.llm_decoder.engine.llm_engine import LLMEngine
    from services.llm_decoder.models import load_language_model
    from services.vision_encoder import __main__ as vision_main
    from services.vision_encoder.encoder import VisionRunner, load_vision_model

    def service_args(module, *extra: str):
        sys.argv = ["baseline", "--model", args.baseline_of, "--device", args.device, *extra]
        return module.parse_args()

    v = service_args(vision_main)
    path, cfg, dtype = weights.open_checkpoint(v, parts=("vision",))
    model = load_vision_model(cfg, path, v.device, dtype)
    runner = VisionRunner(model, v.device, v.max_batch_tiles, v.cuda_graph_tiles, v.compile)
    tiles = torch.from_numpy(tile_image(noise_image(*args.image, seed=2), args.max_num))
    vit_ms = 1000 * timed(lambda: runner.launch([tiles])(), args.device, 5)  # medians after a first use
    del model, runner

    d = service_args(decoder_main, "--kv-cache-tokens", str(args.kv_cache_tokens))
    model = load_language_model(cfg, path, d.device, dtype)
    max_model_len = d.max_model_len or cfg.text.max_position_embeddings
    engine = LLMEngine(model, num_blocks=decoder_main.kv_blocks(d, model, max_model_len, dtype),
                       block_size=d.block_size, max_batched_tokens=d.max_batched_tokens, max_running=d.max_running,
                       device=d.device, dtype=dtype, max_model_len=max_model_len, cuda_graphs=bool(d.cuda_graphs),
                       overlap=None if d.overlap else False)
    if d.device.startswith("cuda"):
        engine.warm_up(cfg.text.vocab_size)
    # The measured prompt's length with its image rows (random embeddings: the time does not depend on them); other
    # text each time, so that the prefix cache holds none of it.
    rows = len(tiles) * cfg.tokens_per_tile
    embeds = torch.randn(rows, cfg.text.hidden_size).to(d.device, dtype)
    runs = iter(range(1000))

    def prefill():
        i = next(runs)
        text = [(i * 31 + j) % 97 + 1 for j in range(args.baseline_prompt - rows)]
        text = [t + 100 if t == cfg.image_token_id else t for t in text]  # no image position among them
        seq = new_sequence(f"baseline-{i}", text[:8] + [cfg.image_token_id] * rows + text[8:], 1, image_embeds=embeds,
                           image_token_id=cfg.image_token_id)
        engine.scheduler.add(seq)
        until_first_token(engine, seq, engine.step)
        while engine.has_work():
            engine.step()

    print(json.dumps({"vit_ms": vit_ms, "prefill_ms": 1000 * timed(prefill, args.device, 3)}), flush=True)


def baseline(ckpt: Path, args, prompt_tokens: int, log) -> dict:
    """compute_baseline in a child process (the stack stopped: its GPU memory is free), its JSON line; with the
    services' thread setting (on the CPU each has half the cores)."""
    out = subprocess.run([sys.executable, "-m", "bench.families", "--baseline-of", str(ckpt), "--device", args.device,
                          "--kv-cache-tokens", str(args.kv_cache_tokens), "--image", *map(str, args.image),
                          "--max-num", str(args.max_num), "--baseline-prompt", str(prompt_tokens)],
                         cwd=ROOT, env={**os.environ, **service_threads(args.device)}, stdout=subprocess.PIPE,
                         stderr=log, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_family(name: str, args, log_dir: Path) -> dict:
    ckpt = Path(args.workdir) / f"{name}-{args.layout}"
    log_path = log_dir / f"{name}-{args.layout}.log"
    row = {"family": name, "layout": args.layout}
    with open(log_path, "w") as log:
        try:
            # A subprocess, so that the generator's GPU memory is all freed before the services start.
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "tools.make_tiny_checkpoint", "--out", str(ckpt), "--family", name,
                            "--layout", args.layout, "--size", args.size, "--device", args.device],
                           cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
            row["write_s"] = f"{time.perf_counter() - start:.1f}"
            row["ckpt_gib"] = f"{sum(f.stat().st_size for f in ckpt.glob('*.safetensors')) / 2 ** 30:.2f}"
            log.flush()
            start = time.perf_counter()
            # KV cache fixed rather than a share of free memory, so memory figures compare across families.
            stack = start_stack(str(ckpt), device=args.device, redis_url=args.redis_url, redis=not args.no_redis,
                                log=log, timeout_s=args.timeout,
                                extra_env={"KV_CACHE_TOKENS": str(args.kv_cache_tokens),
                                           "POOL_WAIT_S": str(args.timeout), "MAX_NUM": str(args.max_num),
                                           **({} if args.recent_images_mb is None else
                                              {"DECODER_RECENT_IMAGES_MB": str(args.recent_images_mb)})})
            try:
                row["ready_s"] = f"{time.perf_counter() - start:.1f}"
                row |= load_times(log_path)
                # Warm-up with another image (no embedding-cache hit), then the measured request.
                cold = chat(stack, ckpt.name, noise_png(*args.image, seed=1), args.max_num, args.max_tokens)
                warm = chat(stack, ckpt.name, noise_png(*args.image, seed=2), args.max_num, args.max_tokens)
                # The embeddings by key (the decoder's recent copy, unless --recent-images-mb 0: read from Redis),
                # the prompt prefilled anew (not the decoder's prefix cache).
                hit = chat(stack, ckpt.name, noise_png(*args.image, seed=2), args.max_num, args.max_tokens,
                           system="Answer in one sentence.")
                row |= {"cold_ms": f"{cold['total_ms']:.0f}", "ttft_ms": f"{warm['ttft_ms']:.0f}",
                        "total_ms": f"{warm['total_ms']:.0f}", "prompt": warm.get("prompt_tokens", "?"),
                        "tokens": warm.get("completion_tokens", "?"), "hit_ttft_ms": f"{hit['ttft_ms']:.0f}",
                        "split": split_text(warm["split"]), "hit_split": split_text(hit["split"])}
                row |= {f"{k}_mib": v for k, v in gpu_mib(stack, args.device).items()}
            finally:
                stack.stop()
            # Targets (issue 16): a miss within 1.3x of the ViT and the prefill alone, a hit within prefill + 15 ms.
            log.flush()
            try:
                base = baseline(ckpt, args, warm["prompt_tokens"], log)
            except subprocess.CalledProcessError as e:  # the stack's figures stand; the log says why
                row["error"] = f"baseline: exit status {e.returncode}, see {log_path.name}"
            else:
                compute = base["vit_ms"] + base["prefill_ms"]
                row |= {"vit_ms": f"{base['vit_ms']:.0f}", "prefill_ms": f"{base['prefill_ms']:.0f}",
                        "miss_ratio": f"{warm['ttft_ms'] / compute:.2f}",
                        "hit_over_ms": f"{hit['ttft_ms'] - base['prefill_ms']:.0f}"}
        finally:
            if not args.keep:
                shutil.rmtree(ckpt, ignore_errors=True)
    return row


COLUMNS = [("family", "family"), ("layout", "layout"), ("ckpt_gib", "ckpt GiB"), ("write_s", "write s"),
           ("vision", "vision load s"), ("decoder", "decoder load s"), ("ready_s", "stack ready s"),
           ("vision_mib", "vision GPU MiB"), ("decoder_mib", "decoder GPU MiB"), ("prompt", "prompt tokens"),
           ("cold_ms", "1st request ms"), ("ttft_ms", "TTFT ms"), ("split", "TTFT split ms"),
           ("hit_ttft_ms", "cache-hit TTFT ms"), ("hit_split", "cache-hit split ms"), ("vit_ms", "ViT alone ms"),
           ("prefill_ms", "prefill alone ms"), ("miss_ratio", "TTFT / (ViT + prefill)"),
           ("hit_over_ms", "cache-hit TTFT - prefill ms"), ("total_ms", "total ms"),
           ("tokens", "tokens"), ("error", "error")]


def split_text(split: dict[str, float]) -> str:
    """The gateway's Server-Timing phases, in the order a request meets them."""
    order = ["fetch", "preprocess", "cache", "prompt", "vision", "store", "read", "decoder"]
    return " ".join(f"{k} {split[k]:.0f}" for k in sorted(split, key=lambda k: order.index(k) if k in order else 99))


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        gpus = smi("--query-gpu=name,memory.total,driver_version")
        return "; ".join(f"{n} ({mib} MiB, driver {drv})" for n, mib, drv in gpus) or "CUDA (nvidia-smi absent)"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def report(rows: list[dict], header: str) -> str:
    columns = [(k, t) for k, t in COLUMNS if k != "error" or any("error" in r for r in rows)]
    cell = lambda v: " ".join(str(v).replace("|", "/").split())  # noqa: E731 (one table cell, one line)
    lines = [header, "", "| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(key, "")) for key, _ in columns) + " |" for r in rows]
    dtypes = sorted({r.get(k) for r in rows for k in ("vision_dtype", "decoder_dtype")} - {None, "?"})
    lines += ["", f"Service dtype: {', '.join(dtypes) or '?'}. Load s: each service's own log line (weights read "
              "and on the device). Stack ready: start of the processes to the gateway answering. 1st request: the "
              "warm-up (cold) request; TTFT and total: the next one, with another image (no cache hit), streamed; "
              "cache hit: that image again, after a system prompt (its embeddings by key: the decoder's recent copy, "
              "read from Redis on the miss, unless its recent images are off (DECODER_RECENT_IMAGES_MB=0): read from "
              "Redis again; the whole prompt prefilled: no KV prefix reused). Split: the gateway's Server-Timing "
              "phases (fetch, preprocess = decode, hash and tile, cache look-up, prompt = template and tokenizer, "
              "vision = the vision pool's call, store = of which the vision pool wrote the embeddings to Redis, read = "
              "the decoder reading them, decoder = the rest of the decoder call to its first token: mostly prefill). "
              "ViT and prefill alone: after the stack stops, the vision model over the measured image's tiles and the "
              "engine's prefill of a prompt as long, with as many image rows, in one process, each built as its "
              "service builds it (medians); issue 16's targets: TTFT / (ViT + prefill) <= 1.3 on a miss, cache-hit "
              "TTFT - prefill <= 15 ms.",
              "GPU MiB: nvidia-smi per process after the requests; * = the service's torch reserved memory (nvidia-smi "
              "did not list its PID), without the CUDA context."]
    return "\n".join(lines) + "\n"


def main() -> None:
    today = datetime.date.today().isoformat()
    p = argparse.ArgumentParser(prog="python -m bench.families", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", choices=sorted(NAMES), default=list(CHECKPOINTS), metavar="NAME",
                   help=f"checkpoint names (default: {' '.join(CHECKPOINTS)}); tiny family names work too")
    p.add_argument("--layout", choices=["original", "native"], default="original")
    p.add_argument("--size", choices=SIZES, default="real")
    p.add_argument("--device", default="cuda", help="where the services run and --size real weights are drawn")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / f"families-{today}.md"))
    p.add_argument("--workdir", default=str(ROOT / ".cache" / "bench"),
                   help="checkpoints (each deleted after its run) and the service logs")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--redis-url", help="an existing Redis (default: start redis-server)")
    p.add_argument("--no-redis", action="store_true", help="no Redis: the services run without the embedding cache")
    p.add_argument("--kv-cache-tokens", type=int, default=65536, help="decoder KV cache (fixed, for comparable memory)")
    p.add_argument("--recent-images-mb", type=int, help="the decoder's DECODER_RECENT_IMAGES_MB (default: its own; 0: "
                   "the cache hit reads the embeddings from Redis)")
    p.add_argument("--image", type=int, nargs=2, default=(800, 600), metavar=("W", "H"), help="noise image size")
    p.add_argument("--max-num", type=int, default=12, help="most tiles (800x600, 12 -> 12 tiles + thumbnail)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds the stack may take to start")
    p.add_argument("--baseline-of", help=argparse.SUPPRESS)  # the child process of `baseline`
    p.add_argument("--baseline-prompt", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.baseline_of:
        return compute_baseline(args)

    log_dir = Path(args.workdir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "bench.families", *sys.argv[1:]])
    redis = "off (--no-redis)" if args.no_redis else (args.redis_url or "redis-server started by the stack")
    header = (f"# Families through the services ({args.size} shapes, random weights)\n\n"
              f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}\n"
              f"- device: {args.device} ({device_name(args.device)})\n- command: `{command}`\n"
              f"- request: {args.image[0]}x{args.image[1]} noise PNG, max_num {args.max_num}, \"{QUESTION}\", "
              f"greedy, max_tokens {args.max_tokens}\n- KV_CACHE_TOKENS: {args.kv_cache_tokens}; Redis: {redis}; "
              f"DECODER_RECENT_IMAGES_MB: {'the default' if args.recent_images_mb is None else args.recent_images_mb}\n"
              f"- logs: {log_dir}")
    rows = []
    for name in args.families:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ({args.size}, {args.layout}) ...", file=sys.stderr, flush=True)
        try:
            rows.append(run_family(name, args, log_dir))
        except Exception as e:  # keep going: one family's failure (e.g. out of memory) must not hide the others
            rows.append({"family": name, "layout": args.layout, "error": f"{type(e).__name__}: {e}"[:200]})
            log = log_dir / f"{name}-{args.layout}.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            print(f"{name} failed: {e}\n--- log tail ---\n{tail}", file=sys.stderr, flush=True)
        out.write_text(report(rows, header))
    print(out.read_text())
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
