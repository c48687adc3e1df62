"""The one-token Triton GEMV (services/common/gemv.py): equal to x @ W^T (+ b) within fp32 accumulation and one
rounding, in Triton's interpreter through bench.gemv's smoke run (tiles that do not divide N or K, a bias);
every candidate of the GPU sweep compiles for sm_90; the committed table is well formed; the CPU never loads it."""
import json
import os
import subprocess
import sys

from services.common import gemv as gv
from services.common.kernel_tables import DEVICE_CLASSES
from tools.run_local import ROOT


def test_kernel_equals_the_float64_product_in_the_interpreter(tmp_path):
    table = tmp_path / "table.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench.gemv", "--smoke", "--tune", str(table), "--out",
                           str(tmp_path / "report.md")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "report.json").read_text())
    assert not result["wrong_candidates"] and len(result["rows"]) == 6
    assert all(row["kernel"] != "-" for row in result["rows"])  # every shape ran a checked candidate
    assert gv.parse_table(json.loads(table.read_text()))["default"] == {}  # interpreter timings choose nothing


def test_gpu_candidates_compile_for_sm90(tmp_path, monkeypatch):
    from bench.gemv import candidates
    from bench.sass import compile_for_sm90

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # a fresh cache: every kernel really compiles
    # The table's configs, and of the tuning candidates the widest tile per warps and stages (registers and shared
    # memory run out there first; all 40 took 80 compiles, 33 s of `make test`).
    widest = {}
    for c in candidates(smoke=False):
        kind = c.warps, c.stages
        widest[kind] = max(widest.get(kind, c), c, key=lambda cfg: cfg.block_n * cfg.block_k)
    configs = set(widest.values()) | {c for shapes in gv._table().values() for c in shapes.values()}
    for cfg in configs:
        for has_bias, gated in ((False, False), (True, False), (False, True)) if cfg == min(configs, key=str) \
                else ((False, False), (False, True)):  # the bias is one branch; a gated input, a loop of its own
            types = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "K": "i32",
                     "stride_wn": "i32", **({"b_ptr": "*bf16"} if has_bias else {})}
            constants = {"HAS_BIAS": has_bias, "GATED": gated, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                         "STAGES": cfg.stages, **({} if has_bias else {"b_ptr": None})}
            compile_for_sm90(gv._gemv, types, constants, ("N", "K", "stride_wn"), num_warps=cfg.warps)


def test_committed_table_is_well_formed():
    raw = json.loads(gv.CONFIGS.read_text())
    assert "default" in raw
    for cls, entry in raw.items():
        assert (cls == "default" or cls in DEVICE_CLASSES) and entry["source"], cls
    for shapes in gv.parse_table(raw).values():
        for (n, k), cfg in shapes.items():
            assert n > 0 and k > 0 and cfg.block_n & (cfg.block_n - 1) == 0 and cfg.block_k & (cfg.block_k - 1) == 0


def test_the_cpu_never_loads_the_kernel():
    code = ("import sys, torch\n"
            "from services.common.layers import linear\n"
            "linear(torch.randn(1, 64), torch.randn(32, 64))\n"
            "assert 'services.common.gemv' not in sys.modules and 'triton' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
