"""Checkpoint reading: the model description, lazy per-service loading, and clear start-up errors."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.cache import decode_value, encode_value, image_cache_key
from services.common.checkpoint import TensorReader, read_model_config
from services.common.tensors import to_proto
from services.llm_decoder.models import load_language_model
from services.vision_encoder.encoder import load_vision_model


def test_model_description(tiny_checkpoint):
    cfg = read_model_config(tiny_checkpoint)
    assert cfg.layout == "native" and cfg.text.family == "qwen2" and cfg.ps_version == "v2"
    assert cfg.tokens_per_tile == 256 and not cfg.text.tie_word_embeddings
    assert (cfg.text.num_heads, cfg.text.num_kv_heads) == (4, 2)


def test_each_service_reads_only_its_tensors(tiny_checkpoint, monkeypatch):
    read = []
    original = TensorReader.tensors
    monkeypatch.setattr(TensorReader, "tensors",
                        lambda self, wanted, desc="": ((read.append(n), (n, t))[1] for n, t in original(self, wanted)))
    cfg = read_model_config(tiny_checkpoint)
    load_vision_model(cfg, tiny_checkpoint, "cpu", torch.float32)
    assert read and all(not n.startswith("language_model.") for n in read)
    read.clear()
    load_language_model(cfg, tiny_checkpoint, "cpu", torch.float32)
    assert read and all(n.startswith("language_model.") for n in read)


@pytest.fixture
def damaged(tiny_checkpoint, tmp_path):
    """A copy of the checkpoint to break."""
    path = tmp_path / "damaged"
    shutil.copytree(tiny_checkpoint, path)
    return path


def test_missing_tensor_is_named(damaged):
    index = json.loads((damaged / "model.safetensors.index.json").read_text())
    victim = "language_model.model.layers.1.self_attn.k_proj.weight"
    shard = damaged / index["weight_map"].pop(victim)
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard, metadata={"format": "pt"})
    (damaged / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"missing tensors for language_model\.model\.layers\.1\.self_attn"
                                         r"\.qkv_proj\.weight\[k\]"):
        load_language_model(read_model_config(damaged), damaged, "cpu", torch.float32)


def test_unknown_family_fails_at_start(damaged):
    config = json.loads((damaged / "config.json").read_text())
    config["text_config"]["model_type"] = "mamba"
    (damaged / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported language model family 'mamba'"):
        read_model_config(damaged)
    config["model_type"] = "llava"
    (damaged / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type='llava'"):
        read_model_config(damaged)


def test_cache_values_from_other_models_or_corrupt_are_misses():
    emb = to_proto(torch.randn(2 * 4, 8))
    value = encode_value("fp-a", 2, emb)
    assert decode_value(value, "fp-a", tokens_per_tile=4).tiles == 2
    assert decode_value(value, "fp-b", tokens_per_tile=4) is None          # another model
    assert decode_value(value, "fp-a", tokens_per_tile=8) is None          # rows do not match the header
    assert decode_value(value[:-7], "fp-a", tokens_per_tile=4) is None      # truncated
    assert decode_value(b"\xff\x00garbage", "fp-a", tokens_per_tile=4) is None
    keys = {image_cache_key("ns", "fp", "sha", m, True, 448) for m in (6, 12)}
    assert len(keys) == 2
