"""Benchmarks: each prints ratios against a baseline measured in the same run and writes its report."""
import json
from pathlib import Path


def save(out: Path, markdown: str, result: dict) -> None:
    """A report: the markdown at `out` (or only the JSON, when `out` names a .json file), the JSON beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix != ".json":
        out.write_text(markdown)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
