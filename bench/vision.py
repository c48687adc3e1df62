"""The vision pool's model (InternViT + pixel shuffle + projector) against transformers' path on the same weights.

Measured in one run, random weights at a family's real shapes (or tiny ones with --smoke):
1. throughput: tiles/s at --batch tiles per forward pass (ours: uint8 tiles in, normalisation included;
   transformers: `get_image_features` on pixel values already normalised on the device), and the share of the
   matmul limit (--peak-tflops) that is;
2. latency of one --image-tiles image: the model alone, and through the service's TileBatcher (host uint8 tiles in,
   host embeddings out: the copies the service makes);
3. agreement: the largest difference between the two outputs.
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

from bench import save  # noqa: E402
from services.common.checkpoint import read_model_config  # noqa: E402
from services.vision_encoder.encoder import TileBatcher, load_vision_model  # noqa: E402
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


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


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
    def ours_fn(n):
        return ours(on_device[:n])

    @torch.inference_mode()
    def hf_fn(n):
        return hf.model.get_image_features(pixel_values=pixels[:n], vision_feature_layer=-1,
                                           vision_feature_select_strategy="default").pooler_output

    a, b = ours_fn(args.image_tiles), hf_fn(args.image_tiles).reshape(-1, cfg.text.hidden_size)
    diff = (a.float() - b.float()).abs().max().item()
    scale = b.float().abs().max().item()

    batch_ours = timed(lambda: ours_fn(args.batch), device, args.repeat)
    batch_hf = timed(lambda: hf_fn(args.batch), device, args.repeat)
    image_ours = timed(lambda: ours_fn(args.image_tiles), device, args.repeat)
    image_hf = timed(lambda: hf_fn(args.image_tiles), device, args.repeat)

    async def through_batcher() -> float:
        batcher = TileBatcher(ours, device, max_batch_tiles=args.batch, max_wait_s=0.0)
        batcher.start()
        image = tiles[:args.image_tiles]
        await batcher.encode([image])  # warm-up
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            await batcher.encode([image])
            times.append(time.perf_counter() - start)
        batcher.worker.cancel()
        return statistics.median(times)

    image_service = asyncio.run(through_batcher())
    flops = tile_flops(cfg)
    row = {"batch": args.batch, "image_tiles": args.image_tiles,
           "ours_tiles_s": args.batch / batch_ours, "hf_tiles_s": args.batch / batch_hf,
           "throughput_ratio": batch_hf / batch_ours,
           "ours_image_ms": image_ours * 1e3, "hf_image_ms": image_hf * 1e3, "latency_ratio": image_hf / image_ours,
           "service_image_ms": image_service * 1e3, "tile_gflop": flops / 1e9,
           "matmul_limit_tiles_s": args.peak_tflops * 1e12 / flops,
           "max_abs_diff": diff, "max_abs_value": scale}
    row["share_of_limit"] = row["ours_tiles_s"] / row["matmul_limit_tiles_s"]
    return row


def report(result: dict) -> str:
    m, r = result["meta"], result["row"]
    lines = [f"# Vision model vs transformers ({m['family']}, {m['size']}, {m['dtype']}, {m['device']})", "",
             f"- date: {m['date']}", f"- device: {m['device_name']}", f"- command: `{m['command']}`",
             f"- transformers {m['transformers']}; weights: random, identical in both", "",
             "| tiles/batch | ours tiles/s | transformers tiles/s | ours/transformers | matmul limit tiles/s "
             "| share of limit | image tiles | ours ms | transformers ms | ours/transformers | through TileBatcher ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| {r['batch']} | {r['ours_tiles_s']:.1f} | {r['hf_tiles_s']:.1f} | {r['throughput_ratio']:.2f} "
             f"| {r['matmul_limit_tiles_s']:.0f} | {r['share_of_limit']:.1%} | {r['image_tiles']} "
             f"| {r['ours_image_ms']:.2f} | {r['hf_image_ms']:.2f} | {r['latency_ratio']:.2f} "
             f"| {r['service_image_ms']:.2f} |", "",
             f"Ratios > 1: ours is faster. Largest output difference {r['max_abs_diff']:.3g} (outputs up to "
             f"{r['max_abs_value']:.3g}). Ours takes uint8 tiles and normalises them itself; transformers gets "
             f"pixel values normalised beforehand, on the device. Through TileBatcher: host uint8 tiles in, host "
             f"embeddings out, as the service runs. Matmul limit: {r['tile_gflop']:.1f} GFLOP per tile at "
             f"{m['peak_tflops']:g} TFLOP/s."]
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
    p.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 TFLOP/s of the device (H200: 790)")
    p.add_argument("--out", help="markdown report, JSON beside it (default bench/results/vision-<device>-<date>.md)")
    args = p.parse_args()
    args.batch = args.batch or (4 if args.smoke else 64)
    args.image_tiles = args.image_tiles or (3 if args.smoke else 13)
    args.repeat = args.repeat or (2 if args.smoke else 10)
    tag = args.device.split(":")[0]
    out = Path(args.out or ROOT / "bench" / "results" / f"vision-{tag}-{datetime.date.today().isoformat()}.md")
    import transformers
    device_name = torch.cuda.get_device_name(args.device) if tag == "cuda" else "cpu"
    result = {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": args.device,
                       "device_name": device_name, "family": args.family, "size": "tiny" if args.smoke else "real",
                       "dtype": "float32" if args.smoke else "bfloat16", "peak_tflops": args.peak_tflops,
                       "transformers": transformers.__version__,
                       "command": shlex.join(["python", "-m", "bench.vision", *sys.argv[1:]])},
              "row": run(args)}
    save(out, report(result), result)
    print(report(result))


if __name__ == "__main__":
    main()
