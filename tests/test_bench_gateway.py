"""bench/gateway.py in its smoke mode: a real gateway process against a real Redis and stub pools; each mode's
images reach the decoder as that mode says (the run checks it), and the CPU per request is reported."""
import math

from tests.conftest import run_bench


def test_smoke_run_measures_both_modes(tmp_path):
    text, result = run_bench("gateway", tmp_path / "gateway.md")
    assert "requests/s per core" in text
    modes = {r["mode"]: r for r in result["modes"]}
    assert set(modes) == {"by reference", "inline"}
    assert modes["by reference"]["inline_mb_per_request"] == 0
    assert modes["inline"]["inline_mb_per_request"] > 27  # the 8B-shaped rows went through the gateway
    for row in modes.values():
        assert row["cpu_s"] > 0 and math.isfinite(row["cpu_ms"]) and row["requests"] == 10
