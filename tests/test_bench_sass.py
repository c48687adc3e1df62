"""bench.sass: the AWQ kernels' loops compiled for sm_90 and counted without a GPU, beside another revision's."""
import json
import os
import subprocess
import sys

from tools.run_local import ROOT


def test_fused_loops_convert_no_weight_and_the_base_compiles_beside(tmp_path):
    """The fused kernels compute with the exact weights: no weight is converted between float formats in their K
    loops (a kernel that rounded each weight to x's dtype had one conversion per two weights). --base compiles
    another copy of the kernels beside them (a file here: a checkout may come without git history)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    base = tmp_path / "awq_triton.py"
    base.write_text((ROOT / "services/llm_decoder/models/awq_triton.py").read_text())
    out = subprocess.run([sys.executable, "-m", "bench.sass", "--smoke", "--base", str(base), "--out",
                          str(tmp_path / "sass.md")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "sass.json").read_text())["rows"]
    assert {(r["config"].split()[0], r["dtype"]) for r in rows} == {(p, d) for p in ("gemv+split8", "gemm+split2")
                                                                   for d in ("fp16", "bf16")}
    assert all(r["loop"] > 100 and r["conversions"] == 0 and r["base_loop"] == r["loop"] for r in rows)
