"""Model-file details the end-to-end family tests cannot isolate: wqkv split, rope scaling, v1 pixel shuffle."""
import json
import shutil

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from services.common.checkpoint import read_model_config
from services.llm_decoder.models import load_language_model
from services.llm_decoder.models.internlm2 import split_wqkv
from services.llm_decoder.models.llama import rotary_cos_sin
from services.vision_encoder.encoder import load_vision_model
from tools.make_tiny_checkpoint import write_tiny_checkpoint


def test_wqkv_split_on_grouped_query_attention():
    """8 query heads over 2 KV heads: each stored group is [4 query heads, key, value]; every row is labelled."""
    heads, kv, d = 8, 2, 3
    g = heads // kv
    rows = []
    for group in range(kv):
        rows += [("q", group * g + i, j) for i in range(g) for j in range(d)]
        rows += [("k", group, j) for j in range(d)] + [("v", group, j) for j in range(d)]
    code = {"q": 0, "k": 1000, "v": 2000}
    wqkv = torch.tensor([[code[kind] + head * 10 + j] for kind, head, j in rows], dtype=torch.float32)
    q, k, v = split_wqkv(wqkv, heads, kv, d)
    assert q[:, 0].tolist() == [h * 10 + j for h in range(heads) for j in range(d)]
    assert k[:, 0].tolist() == [1000 + h * 10 + j for h in range(kv) for j in range(d)]
    assert v[:, 0].tolist() == [2000 + h * 10 + j for h in range(kv) for j in range(d)]


@pytest.mark.parametrize("seq_len", [100, 5000])
def test_dynamic_ntk_rope_matches_transformers(seq_len):
    """Below the trained length dynamic NTK is the default table; beyond it, the rescaled base."""
    hf = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=2048,
                     rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf, seq_len=seq_len)
    positions = torch.arange(seq_len)
    ours_cos, _ = rotary_cos_sin(positions, _text_config(hf), torch.float32, seq_len=seq_len)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    assert torch.allclose(ours_cos, torch.cat([freqs, freqs], -1).cos(), atol=1e-6)


def _text_config(hf):
    from services.common.checkpoint import _text_config as parse
    return parse({**hf.to_dict(), "vocab_size": 10, "intermediate_size": 8, "num_hidden_layers": 1}, "llama", False)


@pytest.fixture(scope="module")
def v1_5_original(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("v15") / "ckpt", family="internvl-chat-v1_5",
                                 layout="original")


def _edited(path, tmp_path, edit):
    copy = tmp_path / "edited"
    shutil.copytree(path, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_ps_version_v1_emits_the_token_grid_transposed(v1_5_original, tmp_path):
    v1 = _edited(v1_5_original, tmp_path, lambda c: c.pop("ps_version"))  # absent key: the original default, v1
    assert read_model_config(v1).ps_version == "v1"
    tiles = torch.randint(0, 256, (2, 448, 448, 3), dtype=torch.uint8)
    out = {}
    for name, path in (("v2", v1_5_original), ("v1", v1)):
        out[name] = load_vision_model(read_model_config(path), path, "cpu", torch.float32)(tiles)
    grid = lambda e: e.reshape(2, 16, 16, -1)  # noqa: E731
    assert torch.allclose(grid(out["v1"]), grid(out["v2"]).transpose(1, 2), atol=1e-6)
    assert not torch.allclose(out["v1"], out["v2"])


def test_original_missing_wqkv_is_named(v1_5_original, tmp_path):
    from safetensors.torch import load_file, save_file
    copy = _edited(v1_5_original, tmp_path, lambda c: None)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    victim = "language_model.model.layers.0.attention.wqkv.weight"
    shard = copy / index["weight_map"].pop(victim)
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard)
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"missing tensors for language_model\.model\.layers\.0\.self_attn\.qkv_proj"):
        load_language_model(read_model_config(copy), copy, "cpu", torch.float32)


def test_unknown_original_llm_fails_at_start(v1_5_original, tmp_path):
    copy = _edited(v1_5_original, tmp_path, lambda c: c["llm_config"].update(architectures=["MambaForCausalLM"]))
    with pytest.raises(ValueError, match="unsupported language model 'MambaForCausalLM'"):
        read_model_config(copy)
    copy2 = _edited(v1_5_original, tmp_path / "b", lambda c: c["llm_config"].update(
        quantization_config={"quant_method": "gptq", "bits": 4}))
    with pytest.raises(ValueError, match="unsupported quantization"):
        read_model_config(copy2)


def test_dynamic_rope_is_per_sequence_in_a_mixed_batch():
    """A short sequence batched with one past the trained length keeps the unscaled table."""
    from services.llm_decoder.engine.context import BatchContext
    from services.llm_decoder.models.llama import LlamaForCausalLM

    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64,
                     rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    cfg = _text_config(hf)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    positions = torch.cat([torch.arange(10), torch.arange(100, 110)])
    empty = torch.empty(0)
    ctx = BatchContext(empty, empty, empty, empty, max_query_len=10, max_context_len=110,
                       query_ranges=[(0, 10), (10, 20)])
    cos, _ = model.rotary(positions, ctx, torch.float32)
    assert torch.equal(cos[:10], rotary_cos_sin(positions[:10], cfg, torch.float32)[0])
    assert torch.equal(cos[10:], rotary_cos_sin(positions[10:], cfg, torch.float32, seq_len=110)[0])
    assert not torch.allclose(cos[10:], rotary_cos_sin(positions[10:], cfg, torch.float32)[0])
