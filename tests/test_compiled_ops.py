"""The elementwise chains the GPU runs compiled (`on_gpu_compiled`): dynamo must capture each one whole, for any
token count, and the captured graph must compute what the eager code does. Checked on the CPU through AOTAutograd
(the front end inductor compiles from), so a graph break or a shape specialisation fails here, not on the GPU."""
import subprocess
import sys

import pytest
import torch
import torch._dynamo

from torch._dynamo.testing import CompileCounterWithBackend

from services.common.layers import COMPILE_OPTIONS, add_rms_norm, rms_norm, silu_and_mul
from tools.run_local import ROOT


def _inputs(fn, t: int):
    g = torch.Generator().manual_seed(t)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    if fn is rms_norm:
        return r(t, 64).bfloat16(), r(64).bfloat16(), 1e-6
    if fn is add_rms_norm:
        return r(t, 64).bfloat16(), r(t, 64).bfloat16(), r(64).bfloat16(), 1e-6
    return (r(t, 2 * 48),)


@pytest.mark.parametrize("fn", [rms_norm, add_rms_norm, silu_and_mul], ids=lambda f: f.__name__)
def test_captured_whole_once_for_any_token_count(fn):
    """Compiled as the GPU compiles it: equal to eager, and at most three graphs whatever the token count (the first
    count, then one symbolic in it, and one token), also when the first count equals a width (64 here: dynamo
    gives both one symbol, and the next count needs a graph of its own)."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn.__wrapped__, backend=counter, **COMPILE_OPTIONS)
    for t in (64, 2, 1, 7, 33, 1, 128, 5):
        args, want_args = _inputs(fn, t), _inputs(fn, t)
        got, want = compiled(*args), fn.__wrapped__(*want_args)
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert torch.equal(g, w)
    assert counter.frame_count <= 3


def test_cpu_runs_as_written():
    """On the CPU nothing is compiled (the tests' and `make run`'s path stays eager), and the model code does not even
    import dynamo (seconds of start-up for every CPU process)."""
    code = ("import sys, torch\n"
            "from services.common.layers import RMSNorm\n"
            "from services.llm_decoder.models import llama\n"
            "norm = RMSNorm(64, 1e-6)\n"
            "x, residual = torch.randn(3, 64), torch.randn(3, 64)\n"
            "h, s = norm(x, residual)\n"
            "assert torch.equal(s, x + residual) and torch.equal(h, norm(x + residual))\n"
            "cache = torch.zeros(2, 4, 1, 16)\n"
            "llama.rotary_and_cache(x.view(3, 4, 16), x[:, :16].view(3, 1, 16), x[:, 16:32].view(3, 1, 16),\n"
            "                       torch.randn(3, 16), torch.randn(3, 16), cache, cache, torch.tensor([0, 5, 7]))\n"
            "assert 'torch._dynamo' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
