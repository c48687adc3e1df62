"""The tiny random InternVL checkpoint (tools/make_tiny_checkpoint.py) loads with transformers and behaves."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, InternVLForConditionalGeneration

from tools.make_tiny_checkpoint import CHAT_TEMPLATE, SPECIAL_TOKENS, write_tiny_checkpoint

SYS25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_a"), seed=0)


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return AutoTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def model(ckpt):
    return InternVLForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()


def shard_hashes(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))}


def test_sharded_files(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(ckpt.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert not (ckpt / "model.safetensors").exists()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "preprocessor_config.json", "processor_config.json"):
        assert (ckpt / name).is_file(), name


def test_config(ckpt, model, tokenizer):
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["tie_word_embeddings"] is False and raw["text_config"]["tie_word_embeddings"] is False
    cfg = model.config
    assert cfg.image_seq_length == 256 and cfg.downsample_ratio == 0.5
    assert tuple(cfg.vision_config.image_size) == (448, 448) and tuple(cfg.vision_config.patch_size) == (14, 14)
    assert cfg.text_config.vocab_size == len(tokenizer)
    assert cfg.text_config.num_key_value_heads < cfg.text_config.num_attention_heads  # GQA
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert gen["pad_token_id"] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 448, "width": 448} and pre["image_mean"] == [0.485, 0.456, 0.406]
    assert json.loads((ckpt / "processor_config.json").read_text())["image_seq_length"] == 256


def test_lm_head_untied_and_loaded(ckpt, model):
    lm_head = model.lm_head.weight
    embed = model.get_input_embeddings().weight
    assert lm_head.data_ptr() != embed.data_ptr()
    assert not torch.equal(lm_head, embed)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    key = next(k for k in index if k.endswith("lm_head.weight"))
    with safe_open(ckpt / index[key], framework="pt") as f:
        stored = f.get_tensor(key)
    assert stored.dtype == torch.float32
    assert torch.equal(lm_head.detach(), stored)


def test_special_tokens(model, tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))
    assert ids[-1] == len(tokenizer) - 1
    assert tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == model.config.image_token_id
    assert tokenizer.context_image_token_id == model.config.image_token_id
    named = (tokenizer.start_image_token, tokenizer.end_image_token, tokenizer.video_token)
    assert named == ("<img>", "</img>", "<video>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    # Added tokens are atomic, and no BOS is prepended.
    assert tokenizer("<img><IMG_CONTEXT></img>").input_ids == [ids[3], ids[5], ids[4]]


def test_chinese_round_trip(tokenizer):
    for text in (SYS25, "Describe the image. 图中有什么？ 1234"):
        assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_chat_template(ckpt, tokenizer):
    assert (ckpt / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\n<IMG_CONTEXT>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
    plain = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert plain == "<|im_start|>user\nhi<|im_end|>\n"  # no default system message


def test_greedy_generation_is_varied(model, tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello, who are you?"}],
                                           tokenize=False, add_generation_prompt=True)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    new = out[0, input_ids.shape[1]:].tolist()
    assert len(new) == 16 and len(set(new)) > 1


def test_same_seed_is_byte_identical(ckpt, tmp_path_factory):
    again = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_b"), seed=0)
    assert shard_hashes(again) == shard_hashes(ckpt)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"):
        assert (again / name).read_bytes() == (ckpt / name).read_bytes(), name
