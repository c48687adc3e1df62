"""The gateway's CPU cost of a cache-hit chat request, against the targets (<= 15 ms of CPU, >= 60 requests/s per core).

The gateway runs as its own process (`python -m services.gateway`, the tiny checkpoint's tokenizer and config: 256
tokens per tile as the real models) against a real redis-server and in-process stub pools: a vision encoder that only
answers Info (a hit never encodes) and a decoder that answers 16 tokens at once. The image (an 800x600 JPEG: 13
tiles, sent as a data URL) has 8B-shaped embeddings in Redis: 13 x 256 rows of 4096 bf16 (27 MB). Two modes, each
with a fresh gateway:
- by reference (the decoder reports reads_cache=True): the gateway asks Redis STRLEN and counts the tiles from the
  image's header; the decoder gets the cache key.
- inline (reads_cache=False): the gateway reads the 27 MB value and sends the rows to the decoder.
Measured: CPU seconds of the gateway process and its children (psutil) over --requests non-streamed requests,
--concurrency at a time, after a warm-up; per request and as requests/s per core (1 / CPU per request).

    python -m bench.gateway                 # report to bench/results/gateway-cpu-<date>.md (+ .json)
    python -m bench.gateway --smoke --out /tmp/gateway.md   # seconds (the test runs this)
"""
import argparse
import asyncio
import base64
import datetime
import io
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import redis

from bench.preprocess import device, photo, table
from internvl.serving.v1 import serving_pb2 as pb
from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from bench import save
from services.common import settings
from services.common.cache import encode_value, image_cache_key
from services.common.checkpoint import checkpoint_id, read_model_config
from services.common.grpc_utils import create_server
from services.gateway.media import image_hash
from tools.run_local import ROOT, TINY_MODEL, free_port, start_redis

TARGET_CPU_MS = 15.0
TARGET_RPS_PER_CORE = 60.0
HIDDEN = 4096           # InternVL2_5-8B
NEW_TOKENS = 16
FINGERPRINT = "bench-vision"


class StubVision(pb_grpc.VisionEncoderServicer):
    def __init__(self, info: pb.ModelInfo):
        self.info = info

    async def Info(self, request, context):
        return self.info


class StubDecoder(pb_grpc.LlmDecoderServicer):
    """16 tokens at once; counts how the images came (by cache key or inline, and the inline bytes)."""

    def __init__(self, info: pb.ModelInfo):
        self.info, self.by_reference, self.inline, self.inline_bytes = info, 0, 0, 0

    async def Info(self, request, context):
        return self.info

    async def Generate(self, request, context):
        for image in request.images:
            if image.cache_key:
                self.by_reference += 1
            else:
                self.inline += 1
                self.inline_bytes += len(image.embeddings.data)
        yield pb.GenerateResponse(token_ids=list(range(10, 10 + NEW_TOKENS)), text="a" * NEW_TOKENS,
                                  finish_reason="length",
                                  usage=pb.Usage(prompt_tokens=len(request.token_ids), completion_tokens=NEW_TOKENS))


def process_cpu(proc: psutil.Process) -> float:
    """CPU seconds of the gateway and of its living children (preprocessing workers)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


async def measure(mode: str, model: Path, redis_url: str, body: bytes, args, log) -> dict:
    checkpoint = checkpoint_id(model)
    reads_cache = mode == "by reference"
    vision = StubVision(pb.ModelInfo(model="bench", fingerprint=FINGERPRINT, checkpoint=checkpoint,
                                     tokens_per_tile=256, hidden_size=HIDDEN))
    decoder = StubDecoder(pb.ModelInfo(model="bench", fingerprint="bench-decoder", checkpoint=checkpoint,
                                       tokens_per_tile=256, hidden_size=HIDDEN, max_model_len=32768,
                                       reads_cache=reads_cache))
    server = create_server()
    pb_grpc.add_VisionEncoderServicer_to_server(vision, server)
    pb_grpc.add_LlmDecoderServicer_to_server(decoder, server)
    pool_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port = free_port()
    # GLIBC_TUNABLES as the image sets it (unless this environment sets its own)
    env = {"GLIBC_TUNABLES": settings.GLIBC_TUNABLES, **os.environ, "MODEL": str(model),
           "VISION_ADDR": f"127.0.0.1:{pool_port}", "DECODER_ADDR": f"127.0.0.1:{pool_port}", "REDIS_URL": redis_url,
           "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port), "GATEWAY_GRPC_PORT": str(free_port()),
           "PREPROCESS_WORKERS": "1", "LOG_LEVEL": "WARNING"}
    gateway = subprocess.Popen([sys.executable, "-m", "services.gateway"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=args.log)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 120
            while True:
                if gateway.poll() is not None:
                    raise RuntimeError(f"the gateway exited with status {gateway.returncode}")
                try:
                    if (await client.get("/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the gateway did not come up")
                await asyncio.sleep(0.2)

            async def one() -> None:
                r = await client.post("/v1/chat/completions", content=body,
                                      headers={"content-type": "application/json"})
                assert r.status_code == 200, r.text[:500]
                assert r.json()["usage"]["completion_tokens"] == NEW_TOKENS

            async def run(n: int) -> None:
                queue = iter(range(n))

                async def worker():
                    for _ in queue:
                        await one()
                await asyncio.gather(*(worker() for _ in range(args.concurrency)))

            await run(args.warmup)
            proc = psutil.Process(gateway.pid)
            seen = (decoder.by_reference, decoder.inline)
            log(f"{mode}: {args.requests} requests, {args.concurrency} at a time")
            cpu, start = process_cpu(proc), time.perf_counter()
            await run(args.requests)
            wall, cpu = time.perf_counter() - start, process_cpu(proc) - cpu
    finally:
        gateway.terminate()
        await asyncio.to_thread(gateway.wait, 30)  # the stub pools answer while it stops
        await server.stop(0)
    by_ref, inline = decoder.by_reference - seen[0], decoder.inline - seen[1]
    if (by_ref, inline) != ((args.requests, 0) if reads_cache else (0, args.requests)):
        raise RuntimeError(f"{mode}: the decoder got {by_ref} images by reference and {inline} inline")
    cpu_ms = 1000 * cpu / args.requests
    return {"mode": mode, "requests": args.requests, "concurrency": args.concurrency, "wall_s": wall,
            "req_s": args.requests / wall, "cpu_s": cpu, "cpu_ms": cpu_ms, "req_s_per_core": 1000 / cpu_ms,
            "cpu_ratio": TARGET_CPU_MS / cpu_ms, "rps_ratio": 1000 / cpu_ms / TARGET_RPS_PER_CORE,
            "inline_mb_per_request": decoder.inline_bytes / max(1, decoder.inline) / 1e6}


def report(result: dict) -> str:
    m = result["meta"]
    lines = ["# Gateway CPU per cache-hit request (stub pools, real Redis)", "", f"- date: {m['date']}",
             f"- device: {m['device']}", f"- command: `{m['command']}`",
             f"- image: {m['image']}; embeddings {m['embeddings']}", ""]
    lines += table([("mode", "mode", 0), ("requests", "requests", 0), ("concurrency", "concurrency", 0),
                    ("cpu_ms", "gateway CPU ms/request", 2), ("req_s_per_core", "requests/s per core", 1),
                    ("cpu_ratio", f"{TARGET_CPU_MS:g} ms / CPU", 2),
                    ("rps_ratio", f"per core / {TARGET_RPS_PER_CORE:g}", 2), ("req_s", "wall requests/s", 1),
                    ("inline_mb_per_request", "MB inline to the decoder", 1)], result["modes"])
    lines += ["", f"Targets: <= {TARGET_CPU_MS:g} ms of gateway CPU per request and >= {TARGET_RPS_PER_CORE:g} "
              "requests/s per core; ratios >= 1 meet them. CPU: the gateway process and its children (psutil), over "
              "the measured requests after a warm-up; requests/s per core = 1 / CPU per request. Wall requests/s: "
              "the client, the stub pools and Redis share the machine with the gateway.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few requests per mode (seconds)")
    p.add_argument("--requests", type=int, help="measured requests per mode (400; smoke: 10)")
    p.add_argument("--warmup", type=int, help="requests before measuring (40; smoke: 3)")
    p.add_argument("--concurrency", type=int, default=2,
                   help="requests in flight")
    p.add_argument("--out", help="markdown report, JSON beside it (default bench/results/gateway-cpu-<date>.md)")
    args = p.parse_args()
    args.requests = args.requests or (10 if args.smoke else 400)
    args.warmup = args.warmup or (3 if args.smoke else 40)
    out = Path(args.out or ROOT / "bench" / "results" / f"gateway-cpu-{datetime.date.today().isoformat()}.md")
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if not (TINY_MODEL / "config.json").exists():
        from tools.make_tiny_checkpoint import write_tiny_checkpoint
        write_tiny_checkpoint(TINY_MODEL)
    cfg = read_model_config(TINY_MODEL)

    image = io.BytesIO()
    photo(800, 600).save(image, "JPEG", quality=90)
    data = image.getvalue()
    tiles = 13
    body = json.dumps({"model": TINY_MODEL.name, "max_tokens": NEW_TOKENS, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(data).decode()}},
        {"type": "text", "text": "Describe the image."}]}]}).encode()
    key = image_cache_key("ivl:emb", FINGERPRINT, image_hash(data), min(cfg.max_dynamic_patch, 12),
                          cfg.use_thumbnail, cfg.vision.image_size)
    rows = tiles * cfg.tokens_per_tile
    value = encode_value(FINGERPRINT, tiles, "bfloat16", [rows, HIDDEN], bytes(rows * HIDDEN * 2))
    result = {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device(),
                       "command": shlex.join(["python", "-m", "bench.gateway", *sys.argv[1:]]),
                       "image": f"800x600 JPEG, {len(data)} bytes, {tiles} tiles, a data URL",
                       "embeddings": f"{rows} x {HIDDEN} bf16, {len(value) / 1e6:.1f} MB"}, "modes": []}
    with tempfile.TemporaryFile() as args.log:
        server, redis_url = start_redis()
        try:
            redis.Redis.from_url(redis_url).set(key, value)
            for mode in ("by reference", "inline"):
                result["modes"].append(asyncio.run(measure(mode, TINY_MODEL, redis_url, body, args, log)))
        except Exception:
            args.log.seek(0)
            sys.stderr.write(args.log.read().decode(errors="replace")[-5000:])
            raise
        finally:
            server.terminate()
            server.wait(10)
    save(out, report(result), result)
    print(report(result))


if __name__ == "__main__":
    main()
