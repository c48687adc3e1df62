"""An image's embeddings through Redis: the embedding cache's value connections against redis-py, same run.

What a cache miss by reference and a cache hit pay to move an 8B model's 13-tile image (3,328 x 4,096 bf16 rows,
27 MB; and a 1B model's, 3,328 x 896, 6 MB) through a private redis-server on this machine:
- write: the vision pool's store (`EmbeddingCache.put` of `value_parts`: the value's fields, then the rows sent
  from the encoder's output as they are) against redis-py's SET of the value built in one piece (`encode_value`),
  as the cache wrote until 2026-11-30;
- read: the decoder's read of a key into a tensor (`EmbeddingCache.get_many`, `decode_value`, `cat_rows`: a view
  of the buffer read into) against redis-py's GET and the same two steps.
Wall time and this process's CPU time per call, medians over --repeat calls of each, alternating; ratios are
redis-py / ours (> 1: ours is faster).

    python -m bench.cache                        # report to bench/results/cache-cpu-<date>.md (+ .json)
    python -m bench.cache --smoke --out /tmp/cache.md   # seconds (the test runs this)
"""
import argparse
import asyncio
import datetime
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import redis.asyncio as redis

from bench import save
from bench.preprocess import device, table
from services.common.cache import EmbeddingCache, decode_value, encode_value, value_parts, value_rows
from services.common.tensors import cat_rows
from tools.run_local import ROOT, start_redis

SHAPES = {"8B, 13 tiles": (3328, 4096), "1B, 13 tiles": (3328, 896)}
SMOKE_SHAPES = {"13 tiles of 64": (3328, 64)}


def to_tensor(raw) -> None:
    """What the decoder does with a value it read: check it, and gather its rows into one tensor."""
    value = decode_value(raw, None, 256)
    cat_rows([(value.embeddings, value_rows(raw, value))])


async def timed(call) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    await call()
    return time.perf_counter() - wall, time.process_time() - cpu


async def measure(url: str, rows: int, width: int, repeat: int) -> dict:
    embeddings = np.random.default_rng(0).integers(0, 1 << 16, (rows, width), dtype=np.uint16)
    tiles = rows // 256
    cache, client = EmbeddingCache(url, ttl_s=600), redis.Redis.from_url(url)

    async def ours_write():
        assert await cache.put("bench-ours", *value_parts("bench", tiles, "bfloat16", [rows, width], embeddings))

    async def redis_py_write():
        await client.set("bench-redis-py", encode_value("bench", tiles, "bfloat16", [rows, width], embeddings),
                         ex=600)

    async def ours_read():
        to_tensor((await cache.get_many(["bench-ours"]))[0])

    async def redis_py_read():
        to_tensor(await client.get("bench-redis-py"))

    calls = {"write": (ours_write, redis_py_write), "read": (ours_read, redis_py_read)}
    times = {(op, who): [] for op in calls for who in ("ours", "redis-py")}
    for op, (ours, theirs) in calls.items():
        await ours(), await theirs()  # connections opened, first-touch costs paid
        for _ in range(repeat):
            times[op, "ours"].append(await timed(ours))
            times[op, "redis-py"].append(await timed(theirs))
    await cache.close()
    await client.aclose()
    out = {"rows": rows, "width": width, "mb": rows * width * 2 / 1e6}
    for (op, who), samples in times.items():
        out[f"{op}_{who}_ms"] = 1e3 * statistics.median(w for w, _ in samples)
        out[f"{op}_{who}_cpu_ms"] = 1e3 * statistics.median(c for _, c in samples)
    for op in calls:
        out[f"{op}_ratio"] = out[f"{op}_redis-py_ms"] / out[f"{op}_ours_ms"]
        out[f"{op}_cpu_ratio"] = out[f"{op}_redis-py_cpu_ms"] / out[f"{op}_ours_cpu_ms"]
    return out


def report(result: dict) -> str:
    m = result["meta"]
    columns = [("name", "embeddings", 0), ("mb", "MB", 1)]
    for op in ("write", "read"):
        columns += [(f"{op}_ours_ms", f"{op} ours ms", 1), (f"{op}_redis-py_ms", f"{op} redis-py ms", 1),
                    (f"{op}_ratio", f"{op} redis-py / ours", 2), (f"{op}_ours_cpu_ms", f"{op} ours CPU ms", 1),
                    (f"{op}_redis-py_cpu_ms", f"{op} redis-py CPU ms", 1)]
    lines = ["# Embeddings through Redis: the cache's value connections vs redis-py", "", f"- date: {m['date']}",
             f"- device: {m['device']}", f"- command: `{m['command']}`", f"- repeat: {m['repeat']}", "",
             *table(columns, result["rows"]), "",
             "Write: `EmbeddingCache.put` of `value_parts` (the rows sent as they are) vs redis-py's SET of "
             "`encode_value` (the value in one piece). Read: `get_many` vs redis-py's GET, each "
             "followed by `decode_value` and `cat_rows` (the decoder's path to a tensor). Medians of wall and CPU "
             "time of this process per call; a private redis-server on this machine, over loopback TCP."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a small value, 3 repetitions (seconds)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", type=Path, help="markdown report path (default bench/results/cache-cpu-<date>.md)")
    args = p.parse_args()
    repeat = 3 if args.smoke else args.repeat
    proc, url = start_redis()
    try:
        rows = []
        for name, (n, width) in (SMOKE_SHAPES if args.smoke else SHAPES).items():
            rows.append({"name": name, **asyncio.run(measure(url, n, width, repeat))})
    finally:
        proc.kill()
        proc.wait()
    now = datetime.datetime.now()
    result = {"meta": {"date": now.isoformat(timespec="seconds"), "device": device(), "repeat": repeat,
                       "command": "python -m bench.cache " + shlex.join(sys.argv[1:])}, "rows": rows}
    markdown = report(result)
    print(markdown)
    save(args.out or ROOT / "bench" / "results" / f"cache-cpu-{now:%Y-%m-%d}.md", markdown, result)


if __name__ == "__main__":
    main()
