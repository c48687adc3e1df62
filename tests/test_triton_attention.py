"""The Triton paged attention equals per-sequence SDPA over the gathered context. Here it runs in Triton's interpreter
(CPU), which must be enabled before triton is imported, hence the subprocess."""
import os
import subprocess
import sys

from tools.run_local import ROOT

def test_paged_attention_equals_sdpa_over_gathered_context():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "tests.triton_attention_check", "cpu"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
