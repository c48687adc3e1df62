"""bench/decoder.py in its smoke mode: engine vs transformers (tiny shapes, fp32 CPU) and the tiny stack over HTTP.

The run must exit 0 (which includes the engine's greedy tokens equalling transformers' for 16 tokens) and write the
markdown and JSON reports with every ratio. The GPU path must not need the gateway's or the stack's dependencies.
"""
import math
import subprocess
import sys

from bench.decoder import SAMPLING_SETTINGS
from tests.conftest import run_bench
from tools.run_local import ROOT


def test_smoke_run_writes_the_ratios(tmp_path):
    text, result = run_bench("decoder", tmp_path / "decoder.md", "--device", "cpu", "--profile", "1",
                             "--trace-compiles")
    for heading in ("engine/transformers", "TTFT while decoding ms", "stack/transformers", "Greedy agreement",
                    "Where a decode step's time goes", "Decode steps by sampling settings"):
        assert heading in text
    assert [r["streams"] for r in result["throughput"]] == [1, 2]
    for row in result["throughput"]:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
        assert row["engine_tokens"] == row["hf_tokens"] == row["streams"] * row["new_tokens"]
        assert row["engine_prefix_cache_hit_tokens"] == 0  # fresh prompts: nothing measured comes from the cache
    assert result["correctness"]["passed"] and result["correctness"]["agree"] >= 16
    ttft = result["ttft"]
    assert ttft["prompt_tokens"] == 13 * 256 + 50 and ttft["alone_ms"] > 0 and ttft["loaded_ms"] > 0
    sampling = result["sampling"]
    assert (sampling["streams"], sampling["prompt_len"]) == (2, 64) and len(sampling["rows"]) == len(SAMPLING_SETTINGS)
    assert sampling["rows"][0]["vs_greedy"] == 1 and all(r["step_ms"] > 0 for r in sampling["rows"])
    stack = result["stack"]
    assert "error" not in stack, stack
    assert stack["requests"] == 4 and stack["stack_tokens"] > 0 and math.isfinite(stack["ratio"]) and stack["ratio"] > 0
    (profile,) = result["profile"]
    assert profile["streams"] == 1 and profile["wall_ms"] > 0 and profile["kernels"] > 0 and profile["top"]
    assert profile["overlap"] is False and profile["overlap_ms"] > 0  # the CPU default, and the other way timed


def test_gpu_path_imports_no_stack_dependencies():
    """The H200 machine has no redis, fastapi or gRPC: building the models and the engine must not import them."""
    code = """
import sys
class Absent:  # as on that machine: importing any of these fails (torch itself tries redis, optionally)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"redis", "fastapi", "grpc", "httpx", "uvicorn"}:
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Absent())
import torch
from bench import decoder as d
shape = d.SHAPES["tiny"]
hf = d.build_transformers(shape, "cpu", torch.float32, 0)
ours = d.build_engine_model(shape, "cpu", torch.float32)
d.copy_weights(hf, ours)
assert "tools" not in sys.modules
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
