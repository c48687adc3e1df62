"""bench/cache.py in its smoke mode: both ways of moving a value run against a real Redis and are reported."""
import math

from tests.conftest import run_bench


def test_smoke_run_compares_both_ways(tmp_path):
    text, result = run_bench("cache", tmp_path / "cache.md")
    assert "redis-py / ours" in text
    [row] = result["rows"]
    for op in ("write", "read"):
        for who in ("ours", "redis-py"):
            assert row[f"{op}_{who}_ms"] > 0 and row[f"{op}_{who}_cpu_ms"] >= 0
        assert math.isfinite(row[f"{op}_ratio"])
