"""The Triton paged attention equals per-sequence SDPA over the gathered context. Here it runs in Triton's interpreter
(CPU), which must be enabled before triton is imported, hence the subprocess; and its kernels compile for sm_90."""
import os
import subprocess
import sys

from tools.run_local import ROOT


def test_paged_attention_equals_sdpa_over_gathered_context():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "tests.triton_attention_check", "cpu"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_kernels_compile_for_h100_h200(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_CACHE_DIR": str(tmp_path)}  # a fresh cache: real compiles
    out = subprocess.run([sys.executable, "-m", "tests.triton_attention_check", "compile"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_arguments_that_change_every_step_are_not_specialized():
    """Triton compiles a kernel per value class of its integer arguments (1, divisible by 16, other): the number of
    sequences and the block tables' width of a step would each compile the attention kernel anew, mid-serving, the
    first time a step had 16 sequences or a 256-token context."""
    from services.llm_decoder.engine.triton_attention import _attn
    assert {p.name for p in _attn.params if p.do_not_specialize} == {"num_seqs", "stride_bt"}
