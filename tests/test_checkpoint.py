"""Checkpoint reading: the model description, lazy per-service loading, and clear start-up errors."""
import json
import shutil

import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from internvl.serving.v1 import serving_pb2 as pb
from services.common.cache import decode_value, encode_value, image_cache_key, value_rows
from services.common.checkpoint import read_model_config
from services.common.weights import TensorReader
from services.gateway.chat import inline
from services.common.tensors import DTYPES, cat_rows, tensor_bytes, to_proto
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
    value = encode_value("fp-a", 2, emb.dtype, emb.shape, emb.data)
    assert decode_value(value, "fp-a", tokens_per_tile=4).tiles == 2
    assert decode_value(value, "fp-b", tokens_per_tile=4) is None          # another model
    assert decode_value(value, "fp-a", tokens_per_tile=8) is None          # rows do not match the header
    assert decode_value(value[:-7], "fp-a", tokens_per_tile=4) is None      # truncated
    short = encode_value("fp-a", 2, emb.dtype, emb.shape, emb.data[:-2])
    assert decode_value(short, "fp-a", tokens_per_tile=4) is None  # rows short of the shape
    for rows, width in ((4, 1), (4, 40), (256, 4096), (3328, 4096)):  # every length of varint: the rows' size is right
        big = encode_value("fp-a", rows // 4, "bfloat16", [rows, width], bytes(rows * width * 2))
        assert decode_value(big, "fp-a", tokens_per_tile=4).tiles == rows // 4
        assert decode_value(big + b"\x20\x01", "fp-a", tokens_per_tile=4) is None
    assert decode_value(b"\xff\x00garbage", "fp-a", tokens_per_tile=4) is None
    keys = {image_cache_key("ns", "fp", "sha", m, True, 448) for m in (6, 12)}
    assert len(keys) == 2


@pytest.mark.parametrize("rows,width,dtype", [(1, 1, "float32"), (8, 40, "bfloat16"), (256, 4096, "bfloat16"),
                                              (3328, 4096, "bfloat16"), (3, 5, "float16")])
def test_a_cache_value_is_the_message_serialized_and_its_rows_are_read_in_place(rows, width, dtype):
    """encode_value writes the rows around the fields itself: the bytes equal the protobuf message's serialization,
    so any protobuf reader parses it; decode_value reads the fields without the rows, and value_rows finds them
    inside without copying them."""
    t = torch.randn(rows, width).to(DTYPES[dtype])
    value = encode_value("fp", max(1, rows // 4), dtype, t.shape, tensor_bytes(t))
    message = pb.CachedEmbeddings(fingerprint="fp", tiles=max(1, rows // 4), embeddings=to_proto(t))
    assert value == message.SerializeToString()
    parsed = decode_value(value, "fp", tokens_per_tile=rows // max(1, rows // 4))
    assert parsed.embeddings.data == b"" and parsed.embeddings.shape == list(t.shape)  # no copy of the rows
    assert bytes(value_rows(value, parsed)) == message.embeddings.data
    assert torch.equal(cat_rows([(parsed.embeddings, value_rows(value, parsed))]), t)  # bytes: copied
    read = bytearray(value)  # as a value read from the cache: a buffer of its own, viewed
    rows_read = cat_rows([(parsed.embeddings, value_rows(read, parsed))])
    view = np.frombuffer(value_rows(read, parsed), np.uint8)
    assert torch.equal(rows_read, t) and rows_read.data_ptr() == view.ctypes.data
    assert inline(parsed, read).embeddings == message.embeddings  # the gateway's rows for a decoder without Redis


def _canonical(data: bytes, tokens_per_tile: int) -> pb.CachedEmbeddings | None:
    """The value protobuf parses from `data` whole, if its header is consistent (tiles, rows, dtype, the rows' bytes)
    and `data` is exactly what encode_value writes for it."""
    try:
        value = pb.CachedEmbeddings.FromString(data)
    except DecodeError:
        return None
    emb = value.embeddings
    ok = value.tiles > 0 and len(emb.shape) == 2 and emb.shape[0] == value.tiles * tokens_per_tile and \
        emb.dtype in DTYPES and len(emb.data) == emb.shape[0] * emb.shape[1] * DTYPES[emb.dtype].itemsize
    return value if ok and encode_value(value.fingerprint, value.tiles, emb.dtype, emb.shape, emb.data) == data \
        else None


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 3), st.sampled_from([1, 3, 40]), st.sampled_from(["float32", "bfloat16"]),
       st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(["flip", "insert", "delete", "cut"]),
                          st.integers(0, 255)), max_size=3))
def test_values_read_without_their_rows_agree_with_protobuf(tiles, width, dtype, edits):
    """decode_value parses a value's fields without its rows: whatever bytes it is given (a value, or one with
    bytes flipped, inserted, deleted or cut off), it takes exactly the values that protobuf's full parse takes as
    encode_value writes them, with the same fields, and finds their rows where protobuf does."""
    rows = bytes(range(256)) * (tiles * 2 * width * DTYPES[dtype].itemsize // 256 + 1)
    data = bytearray(encode_value("fp", tiles, dtype, [tiles * 2, width],
                                  rows[:tiles * 2 * width * DTYPES[dtype].itemsize]))
    for at, edit, byte in edits:
        at %= len(data) + 1
        if edit == "flip" and at < len(data):
            data[at] ^= byte or 1
        elif edit == "insert":
            data[at:at] = bytes([byte])
        elif edit == "delete":
            del data[at:at + 1]
        elif edit == "cut":
            del data[at:]
    data = bytes(data)
    got, want = decode_value(data, None, tokens_per_tile=2), _canonical(data, tokens_per_tile=2)
    assert (got is None) == (want is None)
    if got is not None:
        assert got.embeddings.data == b"" and bytes(value_rows(data, got)) == want.embeddings.data
        want.embeddings.ClearField("data")
        assert got == want


def _rewrite_shards(src, dst, rename, to_bin=False):
    """Copy a checkpoint, renaming every tensor (and optionally storing the shards as PyTorch .bin files)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    weight_map = {}
    for file in sorted(set(index.values())):
        tensors = {rename(n): t for n, t in load_file(src / file).items()}
        out = file.replace("model-", "pytorch_model-").replace(".safetensors", ".bin") if to_bin else file
        torch.save(tensors, dst / out) if to_bin else save_file(tensors, dst / out)
        weight_map.update(dict.fromkeys(tensors, out))
    name = "pytorch_model.bin.index.json" if to_bin else "model.safetensors.index.json"
    (dst / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def _outputs(path):
    cfg = read_model_config(path)
    tiles = torch.randint(0, 256, (1, 448, 448, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    lm = load_language_model(cfg, path, "cpu", torch.float32)
    return load_vision_model(cfg, path, "cpu", torch.float32)(tiles), lm.lm_head.weight, lm.model.layers[0].mlp


def test_native_names_with_the_later_converters_prefixes(tiny_checkpoint, tmp_path):
    """`model.vision_tower.*`, `model.language_model.*`, `lm_head.weight`: read as save_pretrained's names."""
    def later(name):
        for old, new in (("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
                         ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")):
            if name.startswith(old):
                return new + name[len(old):]
        return name
    renamed = _rewrite_shards(tiny_checkpoint, tmp_path / "later", later)
    (a, head_a, mlp_a), (b, head_b, mlp_b) = _outputs(tiny_checkpoint), _outputs(renamed)
    assert torch.equal(a, b) and torch.equal(head_a, head_b)
    assert torch.equal(mlp_a.gate_up_proj.weight, mlp_b.gate_up_proj.weight)


def test_pytorch_bin_shards_load_like_safetensors(tiny_checkpoint, tmp_path):
    converted = _rewrite_shards(tiny_checkpoint, tmp_path / "bin", lambda n: n, to_bin=True)
    assert not list(converted.glob("*.safetensors"))
    (a, head_a, _), (b, head_b, _) = _outputs(tiny_checkpoint), _outputs(converted)
    assert torch.equal(a, b) and torch.equal(head_a, head_b)


def test_awq_config_found_inside_llm_config_or_on_top(tmp_path):
    from tools.make_tiny_checkpoint import write_tiny_checkpoint
    path = write_tiny_checkpoint(tmp_path / "awq", layout="original", awq=True)
    assert read_model_config(path).text.awq_group_size == 32
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = config["llm_config"].pop("quantization_config")
    config["quantization_config"]["version"] = "GEMM"  # AutoAWQ's spelling of LMDeploy's "gemm"
    (path / "config.json").write_text(json.dumps(config))
    assert read_model_config(path).text.awq_group_size == 32


@pytest.mark.parametrize("change", [{"version": "gemv"}, {"zero_point": False}, {"group_size": -1}, {"bits": 8},
                                    {"quant_method": "gptq"}])
def test_an_awq_variant_it_cannot_read_stops_the_service(tmp_path, change):
    """AutoAWQ's GEMV packing (the transposed words: square projections would load and compute garbage), symmetric
    AWQ (no zero points), per-channel groups and other quantizations are refused, naming the configuration."""
    from tools.make_tiny_checkpoint import write_tiny_checkpoint
    path = write_tiny_checkpoint(tmp_path / "awq", layout="original", awq=True)
    config = json.loads((path / "config.json").read_text())
    assert read_model_config(path).text.awq_group_size == 32
    config["llm_config"]["quantization_config"].update(change)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported quantization .* 4-bit AWQ in the GEMM layout"):
        read_model_config(path)


def test_a_checkpoint_trained_without_dynamic_tiling_takes_one_tile(tmp_path):
    """dynamic_image_size false in an original config: one tile, as vLLM's InternVL processing resolves it."""
    from tools.make_tiny_checkpoint import write_tiny_checkpoint
    path = write_tiny_checkpoint(tmp_path / "original", layout="original")
    assert read_model_config(path).max_dynamic_patch == 12
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "dynamic_image_size": False}))
    assert read_model_config(path).max_dynamic_patch == 1


@pytest.mark.parametrize("service", ["vision_encoder", "llm_decoder"])
def test_a_service_refuses_a_broken_checkpoint_at_start_up(damaged, service):
    """The process ends with the reason (the tensors it lacks), not a traceback, and does not start serving."""
    import subprocess
    import sys

    from tools.run_local import ROOT, free_port
    index = json.loads((damaged / "model.safetensors.index.json").read_text())
    for name in [n for n in index["weight_map"] if ".layer.1." in n or ".layers.1." in n]:
        del index["weight_map"][name]
    (damaged / "model.safetensors.index.json").write_text(json.dumps(index))
    out = subprocess.run([sys.executable, "-m", f"services.{service}", "--model", str(damaged), "--port",
                          str(free_port()), "--metrics-port", "0"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    assert "cannot serve this checkpoint" in out.stderr and "missing tensors for" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("keep_head", [False, True])
def test_tied_heads_follow_the_checkpoint(tiny_checkpoint, tmp_path, keep_head):
    """tie_word_embeddings true: without a stored head the embeddings are the head; with one, it is used (as in
    transformers 5). Greedy tokens equal InternVLForConditionalGeneration's either way."""
    from transformers import InternVLForConditionalGeneration

    from services.llm_decoder.engine.llm_engine import LLMEngine
    from services.llm_decoder.engine.sequence import SamplingParams, Sequence

    path = _rewrite_shards(tiny_checkpoint, tmp_path / "tied", lambda n: n)
    if not keep_head:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        shard = path / index["weight_map"].pop("language_model.lm_head.weight")
        tensors = load_file(shard)
        del tensors["language_model.lm_head.weight"]
        save_file(tensors, shard)
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(config))
    cfg = read_model_config(path)
    lm = load_language_model(cfg, path, "cpu", torch.float32)
    assert (lm.lm_head.weight is lm.model.embed_tokens.weight) is not keep_head
    engine = LLMEngine(lm, num_blocks=16, block_size=16, max_batched_tokens=512, max_running=1,
                       device="cpu", dtype=torch.float32)
    seq = Sequence("s", list(range(5, 25)), SamplingParams(10))
    engine.scheduler.add(seq)
    while engine.has_work():
        engine.step()
    reference = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    expected = reference.generate(input_ids=torch.tensor([list(range(5, 25))]), max_new_tokens=10, do_sample=False,
                                  eos_token_id=None)[0, 20:].tolist()
    assert seq.output_ids == expected


def test_weights_fingerprint_tells_checkpoints_with_equal_configs_apart(tiny_checkpoint, tmp_path):
    """Two seeds: the same config and shard index, other weights. Their embeddings must never share a cache entry."""
    from services.common.checkpoint import checkpoint_id
    from services.common.weights import weights_fingerprint
    from tools.make_tiny_checkpoint import write_tiny_checkpoint

    other = write_tiny_checkpoint(tmp_path / "seed1", seed=1)
    assert checkpoint_id(other) == checkpoint_id(tiny_checkpoint)

    def fingerprint(path):
        cfg = read_model_config(path)
        return weights_fingerprint(load_vision_model(cfg, path, "cpu", torch.float32), checkpoint_id(path))
    assert fingerprint(tiny_checkpoint) == fingerprint(tiny_checkpoint) != fingerprint(other)


def test_auto_dtype_serves_an_awq_checkpoint_in_fp16_on_the_gpu(tmp_path):
    """AWQ checkpoints are fp16 throughout (scales, unquantized parts) and served in fp16, as LMDeploy and vLLM serve
    them; others in bf16 on the GPU; fp32 on the CPU; an explicit dtype always wins. Only the dtype is resolved here."""
    import argparse
    from services.common.weights import open_checkpoint
    from tools.make_tiny_checkpoint import write_tiny_checkpoint
    paths = {awq: write_tiny_checkpoint(tmp_path / str(awq), layout="original", awq=awq) for awq in (False, True)}

    def dtype(awq: bool, device: str, name: str = "auto") -> torch.dtype:
        args = argparse.Namespace(model=str(paths[awq]), device=device, dtype=name, cpu_threads=0)
        return open_checkpoint(args, parts=("text",))[2]

    assert dtype(True, "cuda") == dtype(True, "cuda:1") == torch.float16
    assert dtype(False, "cuda") == torch.bfloat16 and dtype(True, "cpu") == dtype(False, "cpu") == torch.float32
    assert dtype(True, "cuda", "bfloat16") == torch.bfloat16 and dtype(False, "cpu", "float16") == torch.float16
