"""bench/vision.py in its smoke mode: the service's vision model against transformers' on the same weights."""
import json
import math
import subprocess
import sys

from tools.run_local import ROOT


def test_smoke_run_writes_the_ratios(tmp_path):
    out = tmp_path / "vision.md"
    proc = subprocess.run([sys.executable, "-m", "bench.vision", "--device", "cpu", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "ours/transformers" in out.read_text()
    row = json.loads(out.with_suffix(".json").read_text())["row"]
    for key in ("throughput_ratio", "latency_ratio", "ours_tiles_s", "service_image_ms", "share_of_limit"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["max_abs_diff"] <= 1e-4 * row["max_abs_value"]  # fp32: the same embeddings
