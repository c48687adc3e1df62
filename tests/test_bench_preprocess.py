"""bench/preprocess.py in its smoke mode: it exits 0 (the gateway's tiles equal the cards'), and reports every ratio."""
import json
import math
import subprocess
import sys

from tools.run_local import ROOT


def test_smoke_run_writes_the_ratios(tmp_path):
    out = tmp_path / "preprocess.md"
    proc = subprocess.run([sys.executable, "-m", "bench.preprocess", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "cards/gateway" in out.read_text()
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["image"] for r in result["per_core"]] == ["800x600 JPEG", "800x600 PNG"]
    for row in result["per_core"]:
        assert row["identical"] and row["tiles"] == 13 and math.isfinite(row["ratio"]) and row["ratio"] > 0
    assert {r["way"] for r in result["transfer"]} == {"pickled array", "shared memory"}
    assert result["scaling"][0]["workers"] == 1 and result["scaling"][0]["images_s"] > 0
