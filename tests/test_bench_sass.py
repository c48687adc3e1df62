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
    assert {(r["config"].split()[0], r["dtype"]) for r in rows} == {(p, d) for p in ("gemv+split8", "gemm+split2",
                                                                                     "gemv+groups")
                                                                   for d in ("fp16", "bf16")}
    assert all(r["loop"] > 100 and r["conversions"] == 0 and r["base_loop"] == r["loop"] for r in rows)


def test_one_token_loops_extract_nibbles_without_a_bit_field_extract(tmp_path, monkeypatch):
    """The fp32 unpacking takes its 0xF mask at run time, so ptxas emits a shift and one LOP3 per nibble; with a
    constant, LLVM's bit-field extract costs a zero-extension (SGXT) more per nibble (60 in a 1x128x64 loop)."""
    from bench.sass import compile_awq, loop_counts
    from services.llm_decoder.models import awq_triton as at

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    for cfg in (at.Config(block=(1, 128, 64), split=4), at.Config(block=(1, 256, 32), stages=1)):
        ops = loop_counts(compile_awq(at._awq_gemm, cfg, "bf16", bias=False).asm["cubin"])
        assert sum(ops.values()) > 100 and ops["SGXT"] == 0, (str(cfg), ops.most_common(6))


def test_in_place_unpacking_takes_three_instructions_a_weight(tmp_path, monkeypatch):
    """Nibbles masked where they lie: a LOP3, an FADD (q - z) and an FFMA (times x) a weight, no multiply by the
    scale in the loop (it comes after the sum over the group), and the whole loop under 5.5 instructions a weight
    where the interleaved tile takes 7.2."""
    from bench.sass import compile_awq, loop_counts
    from services.llm_decoder.models import awq_triton as at

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    for cfg in (at.Config(block=(1, 128, 64), split=16, stages=1, unpack="in-place"),
                at.Config(block=(1, 64, 128), split=16, stages=1, unpack="in-place")):
        ops = loop_counts(compile_awq(at._awq_gemm, cfg, "bf16", bias=False).asm["cubin"])
        weights = cfg.block[1] * cfg.block[2] // (32 * cfg.warps)
        assert ops["LOP3"] == ops["FADD"] == ops["FFMA"] == weights and not ops["FMUL"], (str(cfg), ops)
        assert sum(ops.values()) < 5.5 * weights, (str(cfg), sum(ops.values()) / weights)


def test_prefill_candidates_keep_their_k_loop_in_registers_and_the_tensor_cores_busy(tmp_path, monkeypatch):
    """The tuner's tiles for long prompts (wgmma on sm_90) unpack whole weight tiles into registers: none may spill
    them to local memory in its K loop (a 128x256x64 tile did, 75-95 loads and stores a step, when it scaled an fp32
    accumulator per step), and each step issues fewer instructions (4 a cycle per SM) than its wgmma take cycles
    (~3,800 fp16 flop a cycle per SM: an H100's dense peak over its 132 SMs at 1.98 GHz)."""
    import torch

    from bench.awq import candidates
    from bench.sass import compile_awq, loop_counts
    from services.llm_decoder.models import awq_triton as at

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    tiles = {(c.block, c.warps, c.stages) for c in candidates(512, 2560, 2048, 132, torch.device("cuda"))
             if c.kernel == "fused"}
    assert len(tiles) >= 3
    for block, warps, stages in tiles:  # each tile once, unsplit (the K loop is the same)
        cfg = at.Config(block=block, warps=warps, stages=stages)
        ops = loop_counts(compile_awq(at._awq_gemm, cfg, "fp16", bias=True).asm["cubin"])
        assert ops["HGMMA"] and not ops["LDL"] and not ops["STL"], (str(cfg), ops.most_common(8))
        block_m, block_n, block_k = cfg.block
        issue, mma = sum(ops.values()) * cfg.warps / 4, 2 * block_m * block_n * block_k / 3800
        if block_m >= 128:  # 64-row tiles do half the math per unpacked weight
            assert issue < mma, (str(cfg), issue, mma)


def test_every_kernel_is_launched_and_compiled_with_fp_contraction(tmp_path, monkeypatch):
    """Triton 3.10 compiles without FMA contraction unless asked (3.9 warns of it): every launch asks, as the tables
    were tuned, and so does bench.sass, whatever Triton's default. Launches are caught before they compile."""
    import torch
    from triton.runtime.jit import JITFunction

    from bench.sass import compile_for_sm90
    from services.common import gemv as gv
    from services.llm_decoder.engine.triton_attention import paged_attention
    from services.llm_decoder.engine.triton_rotary import rotary_and_cache
    from services.llm_decoder.models import awq_triton as at
    from services.llm_decoder.models.awq import quantize

    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
    launched = {}
    monkeypatch.setattr(JITFunction, "run", lambda self, *args, grid, warmup, **options:
                        launched.setdefault(self.fn.__name__, options))
    r = lambda *shape: torch.randn(*shape, dtype=torch.float16)  # noqa: E731
    gv.gemv(r(1, 64), r(32, 64), None, gv.Config(block_n=16, block_k=64))
    q = quantize(r(32, 128), 128)
    at.awq_gemm(r(3, 128), q["qweight"], q["qzeros"], q["scales"], 128, config=at.GENERAL)
    at.dequantize_triton(q["qweight"], q["qzeros"], q["scales"], 128, torch.float16)
    cache = r(4, 16, 2, 64)
    paged_attention(r(2, 4, 64), cache, cache, torch.tensor([0, 1, 2], dtype=torch.int32),
                    torch.tensor([5, 9], dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32), 0.125, 1)
    rotary_and_cache(r(2, 4, 64), r(2, 2, 64), r(2, 2, 64), r(2, 32), r(2, 32), cache, cache, torch.arange(2))
    assert set(launched) == {"_gemv", "_awq_gemm", "_awq_dequant", "_attn", "_rotary_and_cache"}
    assert all(options.get("enable_fp_fusion") is True for options in launched.values()), launched

    monkeypatch.undo()
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel = compile_for_sm90(gv._gemv, {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32",
                                         "K": "i32", "stride_wn": "i32"},
                              {"b_ptr": None, "HAS_BIAS": False, "GATED": False, "BLOCK_N": 16, "BLOCK_K": 64,
                               "STAGES": 1}, num_warps=4)
    assert kernel.metadata.enable_fp_fusion
