"""bench/preprocess.py in its smoke mode: it exits 0 (the gateway's tiles equal the cards'), and reports every ratio."""
import math

from tests.conftest import run_bench


def test_smoke_run_writes_the_ratios(tmp_path):
    text, result = run_bench("preprocess", tmp_path / "preprocess.md", timeout_s=300)
    assert "cards/gateway" in text
    assert [r["image"] for r in result["per_core"]] == ["800x600 JPEG", "800x600 PNG"]
    for row in result["per_core"]:
        assert row["identical"] and row["tiles"] == 13 and math.isfinite(row["ratio"]) and row["ratio"] > 0
    assert {r["way"] for r in result["transfer"]} == {"shared memory, a kept slot", "shared memory, a new block",
                                                     "pickled array"}
    assert result["scaling"][0]["workers"] == 1 and result["scaling"][0]["images_s"] > 0
