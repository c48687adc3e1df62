"""bench/awq_engine.py: the AWQ model against the same model's dequantized weights through the engine.

The smoke run (tiny shapes, fp32, CPU) must exit 0, which includes the AWQ model's greedy tokens equalling the dense
model's on every stream (on the CPU the AWQ linears run on their dequantized weight, so any difference is a bug in
quantizing, loading or running the AWQ model). The parts only a GPU run reaches (dispatch, HBM table, target) are
checked here without one.
"""
import json
import math

import torch

from bench import awq_engine as ae
from bench.decoder import SHAPES, build_engine_model, randomize_
from services.llm_decoder.models import awq_triton as at
from services.llm_decoder.models.awq import AWQLinear
from tests.conftest import run_bench


def test_smoke_run_writes_the_ratio_and_equal_tokens(tmp_path):
    text, result = run_bench("awq_engine", tmp_path / "awq-engine.md", "--device", "cpu")
    for heading in ("AWQ/fp32", "AWQ decode ms/step", "Greedy agreement", "identical streams: 3 of 3"):
        assert heading in text, heading
    rows = result["throughput"]
    assert [r["streams"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("ratio", "step_ratio", "dense_tok_s", "awq_tok_s", "dense_step_ms", "awq_step_ms"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        assert r["dense_tokens"] == r["awq_tokens"] == r["streams"] * r["new_tokens"]
        assert r["identical"] == r["compared"] == r["streams"] and r["agree_min"] == r["new_tokens"]
        assert r["prefix_cache_hit_tokens"] == 0
    assert result["correctness"]["passed"] and result["correctness"]["dense"] == result["correctness"]["awq"]
    meta = result["meta"]
    assert 0 < meta["weight_rel_rms"] < 0.2 and meta["awq_weight_bytes"] < meta["dense_weight_bytes"]


@torch.no_grad()
def test_quantize_into_fills_every_parameter_and_writes_back():
    shape = SHAPES["tiny"]
    dense = build_engine_model(shape, "cpu", torch.float32)
    randomize_(dense, 0)
    before = dense.model.layers[0].self_attn.qkv_proj.weight.clone()
    quant = build_engine_model(shape, "cpu", torch.float32, 32)
    for p in quant.parameters():  # anything left unfilled would stay NaN (or -1 in the packed tensors)
        p.fill_(-1 if p.dtype == torch.int32 else float("nan"))
    ae.quantize_into(dense, quant, 32)
    for name, p in quant.named_parameters():
        assert not (p == -1).all() if p.dtype == torch.int32 else not p.isnan().any(), name
    layer = dense.model.layers[0].self_attn.qkv_proj
    awq_layer = quant.model.layers[0].self_attn.qkv_proj
    assert isinstance(awq_layer, AWQLinear) and not torch.equal(layer.weight, before)
    assert torch.equal(layer.weight, awq_layer.dense_weight(torch.float32))
    assert torch.equal(layer.bias, awq_layer.bias.float())
    assert torch.equal(dense.lm_head.weight, quant.lm_head.weight)


def test_gpu_report_parts(tmp_path):
    """What only a CUDA run writes: the dispatch per linear, the HBM table and the issue's target."""
    quant = build_engine_model(SHAPES["qwen2_5_3b"], "meta", torch.bfloat16, 128)
    path = ae.dispatch(quant, "NVIDIA H200", [1, 16])
    assert path["table"].startswith("awq_configs.json, ")  # the committed table (H100/H200 or default entry)
    assert sorted(path["dispatch"][1]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    table = at.parse_table(json.loads(at.CONFIGS.read_text()))
    assert path["dispatch"][16]["gate_up_proj"] == str(at.select(table, "NVIDIA H200", 22016, 2048, 16))
    row = {"streams": 1, "prompt_len": 128, "new_tokens": 128, "repeat": 3, "prefix_cache_hit_tokens": 0,
           "dense_tokens": 128, "awq_tokens": 128, "dense_tok_s": 300.0, "awq_tok_s": 600.0, "ratio": 2.0,
           "dense_prefill_s": 0.01, "awq_prefill_s": 0.01, "dense_step_ms": 3.0, "awq_step_ms": 1.5,
           "step_ratio": 2.0, "agree_min": 40, "identical": 0, "compared": 3, "dense_bytes": int(6.2e9),
           "awq_bytes": int(2.1e9), "dense_hbm_fraction": 0.43, "awq_hbm_fraction": 0.29}
    result = {"meta": {"date": "d", "device": "cuda", "device_name": "NVIDIA H200", "shape": "qwen2_5_3b",
                       "dtype": "bfloat16", "command": "c", "params_m": 3000.0, "group_size": 128,
                       "weight_rel_rms": 0.08, "dense_weight_bytes": int(6.2e9), "awq_weight_bytes": int(2.1e9),
                       "awq_path": path, "hbm_bandwidth": 4.8e12},
              "throughput": [row], "target": {"ratio": 2.0, "target": ae.TARGET, "met": True},
              "correctness": {"verdict": "v", "dense": [1], "awq": [1]}}
    text = ae.report(result)
    for part in ("AWQ/bf16", "% of HBM limit", "target >= 1.5: met", "dispatch at 1 token(s): qkv_proj",
                 "| 1 | 128 | 300.0 | 600.0 | 2.00 |"):
        assert part in text, part
