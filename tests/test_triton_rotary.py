"""The Triton rotary + K/V cache write equals the model's CPU path (rotate, index_copy_ into the caches). Here it runs
in Triton's interpreter (CPU), which must be enabled before triton is imported, hence the subprocess; and it compiles
for sm_90."""
import os
import subprocess
import sys

import pytest

from tools.run_local import ROOT


@pytest.mark.parametrize("mode", ["cpu", "compile"])
def test_rotary_and_cache(mode, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_CACHE_DIR": str(tmp_path)}  # a fresh cache: real compiles
    if mode == "cpu":
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-m", "tests.triton_rotary_check", mode], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
