"""The gateway's image preprocessing against the model cards' `load_image`, on the CPU, in the same run.

1. Per core: CPU seconds (this process, torch limited to one thread) of the gateway's decode + tiling
   (`services.gateway.preprocess.image_tiles`, what a worker runs) and of the cards' `load_image`
   (tests/reference_preprocess.py) on the same encoded image: JPEG and PNG at 1920x1080 and 800x600, generated here.
   Ratio cards / gateway (target >= 2). The tiles are asserted identical: uint8 tiles equal to the cards' crops, and
   normalised as the vision pool does, equal to `load_image` bit for bit (else exit status 1).
2. Moving 13 tiles (7.8 MB) from a worker to the gateway, the ways `Preprocessor` can: a shared memory slot it
   keeps (what `Preprocessor.tiles` does), a new shared memory block (tiles larger than a slot), a pickled array
   through the pool's pipe (/dev/shm full); CPU ms of the gateway process and of the worker per transfer.
3. The pool's scaling: images/s of `Preprocessor.tiles` with 1..N workers (N: the CPUs this process may use, or
   --workers), every image in flight at once; speed-up against 1 worker.
4. One image alone (what its time to first token sees): wall ms of decode + tiles with its resizes on 1 thread and
   spread over the N CPUs (what an idle pool gives it), tiles asserted identical.

    python -m bench.preprocess                 # report to bench/results/preprocess-cpu-<date>.md (+ .json)
    python -m bench.preprocess --smoke --out /tmp/preprocess.md   # seconds (the test runs this)
"""
import argparse
import asyncio
import datetime
import io
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import save
from services.gateway.malloc import reuse_freed_memory
from services.gateway.preprocess import SLOT_BYTES, Preprocessor, available_cpus, image_tiles
from tests.reference_preprocess import IMAGENET_MEAN, IMAGENET_STD, load_image, reference_tiles

ROOT = Path(__file__).resolve().parent.parent
TILE = 448
MAX_PIXELS = 64 * 1024 * 1024
TARGET_RATIO = 2.0


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients with noise: compresses like a photograph (a pure-noise JPEG decodes unusually slowly)."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
    noise = np.random.default_rng(seed).integers(-24, 24, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def gateway(data: bytes) -> np.ndarray:
    return image_tiles(data, MAX_PIXELS, 12, True, TILE)


def cards(data: bytes) -> torch.Tensor:
    return load_image(io.BytesIO(data), input_size=TILE, max_num=12)


def median_ms(fn, reps: int, clock=time.process_time) -> float:
    """Median ms per call of `fn()` by `clock` (CPU time of this process by default; one warm-up call first)."""
    fn()
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return 1000 * statistics.median(times)


def identical(data: bytes) -> bool:
    tiles = gateway(data)
    if not np.array_equal(tiles, reference_tiles(Image.open(io.BytesIO(data)))):
        return False
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float().div(255)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return torch.equal((x - mean) / std, cards(data))


def per_core(sizes: list[tuple[int, int]], reps: int) -> list[dict]:
    rows = []
    for width, height in sizes:
        image = photo(width, height)
        for fmt in ("JPEG", "PNG"):
            data = encode(image, fmt)
            g, c = median_ms(lambda: gateway(data), reps), median_ms(lambda: cards(data), reps)
            rows.append({"image": f"{width}x{height} {fmt}", "bytes": len(data), "tiles": len(gateway(data)),
                         "gateway_ms": g, "cards_ms": c, "ratio": c / g, "identical": identical(data)})
    return rows


def alone(sizes: list[tuple[int, int]], threads: int, reps: int) -> list[dict]:
    rows = []
    for width, height in sizes:
        data = encode(photo(width, height), "JPEG")
        one, spread = (lambda t=t: image_tiles(data, MAX_PIXELS, 12, True, TILE, t) for t in (1, threads))
        rows.append({"image": f"{width}x{height} JPEG", "threads": threads,
                     "one_ms": median_ms(one, reps, time.perf_counter),
                     "spread_ms": median_ms(spread, reps, time.perf_counter),
                     "identical": np.array_equal(one(), spread())})
        rows[-1]["speedup"] = rows[-1]["one_ms"] / rows[-1]["spread_ms"]
    return rows


# --------------------------------------------------------------------------------------- moving tiles back

_TILES: np.ndarray | None = None


def _tiles13() -> np.ndarray:
    """In a worker: the same 13 tiles each time (made once), so only the transfer is measured."""
    global _TILES
    if _TILES is None:
        _TILES = np.random.default_rng(0).integers(0, 256, (13, TILE, TILE, 3), dtype=np.uint8)
    return _TILES


def _worker_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def transfer(reps: int) -> list[dict]:
    """13 tiles back from a worker, the ways `Preprocessor` can: a slot it keeps, a new block per call (tiles larger
    than a slot), a pickled array (/dev/shm full)."""
    rows = []
    for way, slot_bytes in (("shared memory, a kept slot", SLOT_BYTES), ("shared memory, a new block", 0),
                            ("pickled array", 0)):
        pool = Preprocessor(1, slot_bytes)
        call = (lambda: pool.run(_tiles13)) if way == "pickled array" else (lambda: pool.tiles(_tiles13))
        try:
            await call()
            worker, parent = await pool.run(_worker_cpu), time.process_time()
            for _ in range(reps):
                assert (await call()).shape == (13, TILE, TILE, 3)
            parent = time.process_time() - parent
            worker = await pool.run(_worker_cpu) - worker
        finally:
            pool.close()
        rows.append({"way": way, "gateway_ms": 1000 * parent / reps, "worker_ms": 1000 * worker / reps})
    return rows


# ------------------------------------------------------------------------------------------------ scaling

async def scaling(workers: list[int], images_per_worker: int) -> list[dict]:
    data = encode(photo(1920, 1080), "JPEG")
    rows = []
    for n in workers:
        pool = Preprocessor(n)
        try:
            await pool.start()
            await pool.tiles(image_tiles, data, MAX_PIXELS, 12, True, TILE)
            count = n * images_per_worker
            start = time.perf_counter()
            await asyncio.gather(*(pool.tiles(image_tiles, data, MAX_PIXELS, 12, True, TILE) for _ in range(count)))
            rows.append({"workers": n, "images": count, "s": time.perf_counter() - start})
        finally:
            pool.close()
        rows[-1]["images_s"] = rows[-1]["images"] / rows[-1]["s"]
        rows[-1]["speedup"] = rows[-1]["images_s"] / rows[0]["images_s"]
    return rows


# ------------------------------------------------------------------------------------------------- report

def table(columns: list[tuple[str, str, int]], rows: list[dict]) -> list[str]:
    out = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        out.append("| " + " | ".join(f"{row[key]:.{digits}f}" if isinstance(row[key], float) else str(row[key])
                                     for key, _, digits in columns) + " |")
    return out


def report(result: dict) -> str:
    m = result["meta"]
    lines = ["# Gateway preprocessing vs the cards' load_image (CPU)", "", f"- date: {m['date']}",
             f"- device: {m['device']}", f"- command: `{m['command']}`", f"- CPUs available: {m['cpus']}", "",
             "## Per core: decode + tiles (gateway) vs load_image (cards)", ""]
    lines += table([("image", "image", 0), ("bytes", "bytes", 0), ("tiles", "tiles", 0),
                    ("gateway_ms", "gateway CPU ms", 1), ("cards_ms", "cards CPU ms", 1),
                    ("ratio", "cards/gateway", 2), ("identical", "tiles identical", 0)], result["per_core"])
    lines += ["", "CPU time of this process per image (set up as a preprocessing worker: `reuse_freed_memory`), "
              f"median of {m['reps']}, torch on one thread; target "
              f"cards/gateway >= {TARGET_RATIO:g}. Identical: uint8 tiles equal the cards' crops, and normalised "
              "they equal load_image's pixel_values bit for bit.", "",
              "## Moving 13 tiles (7.8 MB) from a worker", ""]
    lines += table([("way", "way", 0), ("gateway_ms", "gateway CPU ms", 2), ("worker_ms", "worker CPU ms", 2)],
                   result["transfer"])
    lines += ["", "## Pool scaling (1920x1080 JPEG, all images in flight at once)", ""]
    lines += table([("workers", "workers", 0), ("images", "images", 0), ("s", "s", 2),
                    ("images_s", "images/s", 1), ("speedup", "speed-up vs 1 worker", 2)], result["scaling"])
    lines += ["", "Wall time; on a machine shared with other work the speed-up is bounded by the idle cores.", "",
              "## One image alone: its resizes on 1 thread and spread over the CPUs", ""]
    lines += table([("image", "image", 0), ("threads", "threads", 0), ("one_ms", "1 thread ms", 1),
                    ("spread_ms", "spread ms", 1), ("speedup", "speed-up", 2), ("identical", "tiles identical", 0)],
                   result["alone"])
    lines += ["", "Wall ms of decode + tiles in this process, median; what an image gets when the pool's other "
              "workers are idle (`Preprocessor.spare_threads`).", ""]
    return "\n".join(lines)


def device() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {platform.system()} {platform.release()}"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="800x600 only, few repetitions, 1 worker (seconds)")
    p.add_argument("--reps", type=int, help="timed calls per measurement (20; smoke: 2)")
    p.add_argument("--workers", type=int, help="the most workers of the scaling run (default: the CPUs available)")
    p.add_argument("--out", help="markdown report, JSON beside it (default bench/results/preprocess-cpu-<date>.md)")
    args = p.parse_args()
    torch.set_num_threads(1)
    reuse_freed_memory()  # this process runs what a worker runs, set up as a worker is (the cards' path gains too)
    reps = args.reps or (2 if args.smoke else 20)
    most = 1 if args.smoke else args.workers or available_cpus()
    out = Path(args.out or ROOT / "bench" / "results" / f"preprocess-cpu-{datetime.date.today().isoformat()}.md")
    sizes = [(800, 600)] if args.smoke else [(1920, 1080), (800, 600)]
    result = {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device(),
                       "command": shlex.join(["python", "-m", "bench.preprocess", *sys.argv[1:]]),
                       "cpus": available_cpus(), "reps": reps}}
    result["per_core"] = per_core(sizes, reps)
    result["transfer"] = asyncio.run(transfer(max(reps, 5)))
    result["scaling"] = asyncio.run(scaling(list(range(1, most + 1)), 2 if args.smoke else 8))
    result["alone"] = alone(sizes, max(2, args.workers or available_cpus()), reps)
    save(out, report(result), result)
    print(report(result))
    if not all(row["identical"] for row in result["per_core"] + result["alone"]):
        print("FAIL: tiles differ from the cards'", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
