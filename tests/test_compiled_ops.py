"""The elementwise chains the GPU runs compiled (`on_gpu_compiled`): dynamo must capture each one whole, for any
token count, and the captured graph must compute what the eager code does. Checked on the CPU through AOTAutograd
(the front end inductor compiles from), so a graph break or a shape specialisation fails here, not on the GPU."""
import re
import subprocess
import sys

import pytest
import torch
import torch._dynamo

from torch._dynamo.testing import CompileCounterWithBackend

from services.common.layers import COMPILE_OPTIONS, add_rms_norm, rms_norm, silu_and_mul
from services.llm_decoder.models.llama import rotary_and_cache
from tools.run_local import ROOT


def _inputs(fn, t: int):
    g = torch.Generator().manual_seed(t)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    if fn is rms_norm:
        return r(t, 64).bfloat16(), r(64).bfloat16(), 1e-6
    if fn is add_rms_norm:
        return r(t, 64).bfloat16(), r(t, 64).bfloat16(), r(64).bfloat16(), 1e-6
    if fn is rotary_and_cache:  # q, k, v as the strided views of a fused qkv projection that the model passes
        qkv = r(t, 6 * 16)
        k_cache, v_cache = torch.zeros(3 * t, 4, 1, 16), torch.zeros(3 * t, 4, 1, 16)  # blocks of 4 slots
        slots = torch.randperm(12 * t, generator=g)[:t]
        return (qkv[:, :64].view(t, 4, 16), qkv[:, 64:80].view(t, 1, 16), qkv[:, 80:].view(t, 1, 16), r(t, 16),
                r(t, 16), k_cache, v_cache, slots)
    return (r(t, 2 * 48),)


@pytest.mark.parametrize("fn", [rms_norm, add_rms_norm, rotary_and_cache, silu_and_mul], ids=lambda f: f.__name__)
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
        for g, w in zip(args, want_args):  # what it writes in place (the KV caches) too
            assert not isinstance(g, torch.Tensor) or torch.equal(g, w)
    assert counter.frame_count <= 3


def test_inductor_writes_the_kv_cache_in_place():
    """Compiled by inductor (here its CPU code; buffer planning is the same for the GPU), the cache writes go to the
    caches themselves: no buffer sized by the caches' block count, which would copy gigabytes per layer and step.
    (The runner's k and v caches are separate tensors: caches aliasing one storage would get such a copy.)"""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    compiled = torch.compile(rotary_and_cache.__wrapped__, **COMPILE_OPTIONS)
    for t in (5, 9):  # the second call runs the graph made symbolic in the token count
        args = _inputs(rotary_and_cache, t)
        (q, k), (code,) = run_and_get_code(compiled, *args)
        _, _, v, _, _, k_cache, v_cache, slots = args
        assert torch.equal(k_cache.view(-1, 1, 16)[slots], k) and torch.equal(v_cache.view(-1, 1, 16)[slots], v)
    # The caches are the only 4-d inputs: (blocks, block_size, 1, head_dim), blocks a symbol.
    blocks = set(re.findall(r"assert_size_stride\(\w+, \((s\d+), s\d+, 1, s\d+\)", code))
    allocations = [line for line in code.splitlines() if re.search(r"buf\d+ = empty_strided", line)]
    assert blocks and allocations
    assert not [line for line in allocations if set(re.findall(r"s\d+", line)) & blocks], allocations


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
