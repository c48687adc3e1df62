"""Benchmarks: each prints ratios against a baseline measured in the same run and writes its report."""
import argparse
import json
import sys
from pathlib import Path


def kernel_args(doc: str, tune_help: str) -> tuple[argparse.Namespace, str, str]:
    """A kernel bench's command line (--smoke, --tune TABLE, --out); with the device and its name."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter), no timing")
    p.add_argument("--tune", type=Path, metavar="TABLE", help=tune_help)
    p.add_argument("--out", type=Path, help="also write the report to this markdown file (and its .json)")
    args = p.parse_args()
    import torch  # the other benches' helpers here need none
    return args, "cpu" if args.smoke else "cuda", "cpu" if args.smoke else torch.cuda.get_device_name()


def kernel_report(out: Path | None, markdown: str, result: dict, wrong: list[str]) -> None:
    """A kernel bench's end: the report printed, saved when asked (`wrong` in its JSON), and the run failed when a
    candidate computed a wrong result (a kernel bug, whatever the tuner chose instead)."""
    print(markdown)
    if out:
        save(out, markdown, result | {"wrong_candidates": wrong})
    if wrong:
        sys.exit(f"{len(wrong)} candidates gave wrong results (see WRONG above)")


def save(out: Path, markdown: str, result: dict) -> None:
    """A report: the markdown at `out` (or only the JSON, when `out` names a .json file), the JSON beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix != ".json":
        out.write_text(markdown)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")


def sync(device: str) -> None:
    """Wait for the work queued on `device` (nothing to wait for on the CPU): a timing ends when the work does."""
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize(device)
