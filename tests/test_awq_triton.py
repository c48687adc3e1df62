"""The Triton W4A16 kernel equals the dequantize path. Here it runs in Triton's interpreter (CPU); on a GPU the same
check runs compiled (bench/awq.py)."""
import os
import subprocess
import sys
import textwrap

from tools.run_local import ROOT

CHECK = textwrap.dedent("""
    import torch
    from services.llm_decoder.models import awq
    from services.llm_decoder.models.awq_triton import awq_gemm

    torch.manual_seed(0)
    # (tokens, in, out, group): one decode token, a ragged output width, several groups per tile
    for m, k, n, g in [(1, 128, 64, 64), (5, 256, 136, 128), (33, 128, 64, 32)]:
        q = awq.quantize(torch.randn(n, k), g)
        x = torch.randn(m, k).half()
        got = awq_gemm(x, q["qweight"], q["qzeros"], q["scales"], g)
        want = torch.nn.functional.linear(x.float(), awq.dequantize(q["qweight"], q["qzeros"], q["scales"], g,
                                                                    torch.half).float())
        assert got.shape == (m, n) and got.dtype == torch.half
        # fp32 accumulation in both; the difference is the fp16 rounding of the output
        assert torch.allclose(got.float(), want, rtol=2e-3, atol=2e-3), (m, k, n, (got.float() - want).abs().max())
    print("ok")
""")


def test_triton_kernel_equals_dequantized_matmul():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
