"""bench/vision.py in its smoke mode: the service's vision model against transformers' on the same weights."""
import math

from tests.conftest import run_bench


def test_smoke_run_writes_the_ratios(tmp_path):
    text, result = run_bench("vision", tmp_path / "vision.md", "--device", "cpu")
    assert "| / transformers |" in text
    r = result["result"]
    assert [row["variant"] for row in r["rows"]] == ["transformers", "eager"]  # graphs and compile: CUDA only
    row = r["rows"][1]
    for key in ("throughput_ratio", "latency_ratio", "tiles_s", "one_tile_ms", "service_image_ms", "share_of_limit"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["max_abs_diff"] <= 1e-4 * r["max_abs_value"]  # fp32: the same embeddings
