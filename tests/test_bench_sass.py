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
