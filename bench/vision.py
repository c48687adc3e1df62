"""The vision pool's model (InternViT + pixel shuffle + projector) against transformers' path on the same weights.

Measured in one run, random weights at a family's real shapes (or tiny ones with --smoke), for each of the service's
runner variants (eager; CUDA graphs over tile-count buckets; torch.compile):
1. throughput: tiles/s at --batch tiles per forward pass (ours: uint8 tiles in, normalisation included;
   transformers: `get_image_features` on pixel values already normalised on the device), and the share of the
   matmul limit (--peak-tflops) that is;
2. latency of one --image-tiles image and of one tile: the model alone, and through the service's TileBatcher (host
   uint8 tiles in, host embeddings out: the copies the service makes);
3. agreement: the largest difference from transformers' output; on CUDA, the eager batch's costliest device operators.
Ratios > 1: ours is faster. Results (markdown + JSON) go to bench/results/ with device, date and command.

    python -m bench.vision --device cuda                              # InternViT-300M + 8B projector, bf16
    python -m bench.vision --device cuda --family internvl-chat-v1_5  # InternViT-6B
    python -m bench.vision --device cpu --smoke                       # tiny shapes (the tests run this)
"""
import argparse
import asyncio
import datetime
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import save, sync  # noqa: E402
from services.common.checkpoint import read_model_config  # noqa: E402
from services.vision_encoder.encoder import TileBatcher, VisionRunner, load_vision_model  # noqa: E402
from services.vision_encoder.intern_vit import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from tools.make_tiny_checkpoint import FAMILIES, build_config, randomize_in_place_  # noqa: E402


def build_checkpoint(family: str, size: str, device: str, out: Path) -> None:
    """transformers' InternVL with random weights at `size`, written to `out`; its LLM cut to one layer (only the
    projector's output width matters here)."""
    from transformers import InternVLForConditionalGeneration

    config = build_config(1024, image_token_id=1000, eos_token_id=1001, family=FAMILIES[family], size=size)
    config.text_config.num_hidden_layers = 1
    config.text_config.vocab_size = 1024
    config.architectures = ["InternVLForConditionalGeneration"]
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    model = model.to(torch.bfloat16 if size == "real" else torch.float32).to_empty(device=device).eval()
    randomize_in_place_(model, seed=0)
    model.save_pretrained(out)


def timed(fn, device: str, repeat: int) -> float:
    """Median seconds of `fn()` over `repeat` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tile_flops(cfg) -> float:
    """Multiply-adds x 2 of one tile through the tower and the projector."""
    v, tokens = cfg.vision, (cfg.vision.image_size // cfg.vision.patch_size) ** 2 + 1
    per_layer = 2 * tokens * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size) \
        + 4 * tokens * tokens * v.hidden_size
    shuffled = int(v.hidden_size / cfg.downsample_ratio ** 2)
    projector = 2 * cfg.tokens_per_tile * (shuffled * cfg.text.hidden_size + cfg.text.hidden_size ** 2)
    return v.num_layers * per_layer + projector


def run(args) -> dict:
    device, size = args.device, "tiny" if args.smoke else "real"
    from transformers import InternVLForConditionalGeneration

    with tempfile.TemporaryDirectory(prefix="bench-vision-") as tmp:
        path = Path(tmp)
        build_checkpoint(args.family, size, device, path)
        cfg = read_model_config(path)
        dtype = torch.bfloat16 if size == "real" else torch.float32
        ours = load_vision_model(cfg, path, device, dtype)
        hf = InternVLForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()

    g = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 256, (args.batch, 448, 448, 3), dtype=torch.uint8, generator=g)
    on_device = tiles.to(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    pixels = ((on_device.permute(0, 3, 1, 2).float() / 255 - mean) / std).to(dtype)

    @torch.inference_mode()
    def hf_fn(n):
        return hf.model.get_image_features(pixel_values=pixels[:n], vision_feature_layer=-1,
                                           vision_feature_select_strategy="default").pooler_output

    want = hf_fn(args.image_tiles).reshape(-1, cfg.text.hidden_size).float()
    flops = tile_flops(cfg)
    hf_row = {"variant": "transformers",
              "tiles_s": args.batch / timed(lambda: hf_fn(args.batch), device, args.repeat),
              "image_ms": timed(lambda: hf_fn(args.image_tiles), device, args.repeat) * 1e3,
              "one_tile_ms": timed(lambda: hf_fn(1), device, args.repeat) * 1e3}
    rows, runners = [hf_row], {}
    for variant in args.variants:
        try:
            row, runners[variant] = measure_variant(variant, ours, tiles, on_device, args)
        except Exception as e:  # a variant that fails on this device is reported; the others still run
            if args.smoke:
                raise
            rows.append({"variant": variant, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        row["max_abs_diff"] = (row.pop("output").float() - want).abs().max().item()
        row["throughput_ratio"] = row["tiles_s"] / hf_row["tiles_s"]
        row["latency_ratio"] = hf_row["image_ms"] / row["image_ms"]
        row["share_of_limit"] = row["tiles_s"] * flops / (args.peak_tflops * 1e12)
        rows.append(row)
    # Eager's kernels say what each op costs; compiled ones, what the service runs by default (inductor's fusions).
    profiles = {variant: kernel_profile(lambda: runners[variant].run(on_device), device)
                for variant in ("eager", "compile") if variant in runners}
    return {"rows": rows, "batch": args.batch, "image_tiles": args.image_tiles, "tile_gflop": flops / 1e9,
            "matmul_limit_tiles_s": args.peak_tflops * 1e12 / flops, "max_abs_value": want.abs().max().item(),
            "profiles": {variant: text for variant, text in profiles.items() if text}}


def measure_variant(variant: str, model, tiles: torch.Tensor, on_device: torch.Tensor,
                    args) -> tuple[dict, VisionRunner]:
    """Set-up time (capture, compilation), tiles/s at the batch, latency of the image and of one tile, the same image
    through TileBatcher, and the image's embeddings; and the runner (warm, for a kernel profile)."""
    device, image = args.device, on_device[:args.image_tiles]
    start = time.perf_counter()
    runner = VisionRunner(model, device, args.batch, graph_tiles=args.batch if variant == "graphs" else 0,
                          compile="inductor" if variant == "compile" else "")
    runner.run(image)  # compiles, for the compiled variant
    runner.run(on_device[:1])
    sync(device)
    return {"variant": variant, "setup_s": time.perf_counter() - start,
            "tiles_s": args.batch / timed(lambda: runner.run(on_device), device, args.repeat),
            "image_ms": timed(lambda: runner.run(image), device, args.repeat) * 1e3,
            "one_tile_ms": timed(lambda: runner.run(on_device[:1]), device, args.repeat) * 1e3,
            "service_image_ms": asyncio.run(through_batcher(runner, tiles[:args.image_tiles], args.repeat)) * 1e3,
            "output": runner.run(image)}, runner


async def through_batcher(runner: VisionRunner, image: torch.Tensor, repeat: int) -> float:
    """Median seconds for one image through the service's TileBatcher: host uint8 tiles in, host rows out."""
    batcher = TileBatcher(runner, max_wait_s=0.0)
    batcher.start()
    await batcher.encode([image])  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        await batcher.encode([image])
        times.append(time.perf_counter() - start)
    batcher.worker.cancel()
    return statistics.median(times)


def kernel_profile(fn, device: str, top: int = 12) -> str:
    """A batch's most expensive kernels on the device (where a GPU run says the time goes)."""
    if not device.startswith("cuda"):
        return ""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=90)


def report(result: dict) -> str:
    m, r = result["meta"], result["result"]
    lines = [f"# Vision model vs transformers ({m['family']}, {m['size']}, {m['dtype']}, {m['device']})", "",
             f"- date: {m['date']}", f"- device: {m['device_name']}", f"- command: `{m['command']}`",
             f"- transformers {m['transformers']}; weights: random, identical in both", "",
             f"| variant | tiles/s at {r['batch']} | share of limit | / transformers | {r['image_tiles']}-tile image ms "
             "| transformers / ours | 1 tile ms | through TileBatcher ms | set-up s | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"| {row['variant']} | failed: {row['error']} |||||||||")
            continue
        ours = row["variant"] != "transformers"
        lines.append(f"| {row['variant']} | {row['tiles_s']:.1f} "
                     f"| {row['share_of_limit']:.1%} | {row['throughput_ratio']:.2f} | {row['image_ms']:.2f} "
                     f"| {row['latency_ratio']:.2f} | {row['one_tile_ms']:.2f} | {row['service_image_ms']:.2f} "
                     f"| {row['setup_s']:.1f} | {row['max_abs_diff']:.3g} |" if ours else
                     f"| transformers | {row['tiles_s']:.1f} | | 1.00 | {row['image_ms']:.2f} | 1.00 "
                     f"| {row['one_tile_ms']:.2f} | | | |")
    lines += ["", f"Ratios > 1: ours is faster. Outputs up to {r['max_abs_value']:.3g}. Ours takes uint8 tiles and "
              "normalises them itself; transformers gets pixel values normalised beforehand, on the device. "
              "Variants: eager; graphs = CUDA graphs over tile-count buckets up to the batch; compile = torch.compile "
              "(inductor). Through TileBatcher: host uint8 tiles in, host embeddings out, as the service runs. "
              "Matmul limit: "
              f"{r['tile_gflop']:.1f} GFLOP per tile at {m['peak_tflops']:g} TFLOP/s = "
              f"{r['matmul_limit_tiles_s']:.0f} tiles/s."]
    for variant, text in r["profiles"].items():
        lines += ["", f"Where the {variant} batch's device time goes:", "", "```", text, "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.vision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--family", default="internvl2_5-internlm2", choices=sorted(FAMILIES),
                   help="whose tower and projector (default: InternViT-300M + the 8B model's projector)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 4 tiles, 2 repeats")
    p.add_argument("--batch", type=int, help="tiles per forward pass (64; smoke 4)")
    p.add_argument("--image-tiles", type=int, help="tiles of the latency image (13; smoke 3)")
    p.add_argument("--repeat", type=int, help="measured runs, the median is reported (10; smoke 2)")
    p.add_argument("--variants", nargs="+", choices=["eager", "graphs", "compile"],
                   help="the runner's variants to measure (all on CUDA; eager on the CPU)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 TFLOP/s of the device (H200: 790)")
    p.add_argument("--out", help="markdown report, JSON beside it (default bench/results/vision-<device>-<date>.md)")
    args = p.parse_args()
    args.batch = args.batch or (4 if args.smoke else 64)
    args.image_tiles = args.image_tiles or (3 if args.smoke else 13)
    args.repeat = args.repeat or (2 if args.smoke else 10)
    args.variants = args.variants or (["eager", "graphs", "compile"] if args.device.startswith("cuda") else ["eager"])
    tag = args.device.split(":")[0]
    out = Path(args.out or ROOT / "bench" / "results" / f"vision-{tag}-{datetime.date.today().isoformat()}.md")
    import transformers
    device_name = torch.cuda.get_device_name(args.device) if tag == "cuda" else "cpu"
    result = {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": args.device,
                       "device_name": device_name, "family": args.family, "size": "tiny" if args.smoke else "real",
                       "dtype": "float32" if args.smoke else "bfloat16", "peak_tflops": args.peak_tflops,
                       "transformers": transformers.__version__,
                       "command": shlex.join(["python", "-m", "bench.vision", *sys.argv[1:]])},
              "result": run(args)}
    save(out, report(result), result)
    print(report(result))


if __name__ == "__main__":
    main()
