"""Write tiny, random, deterministic InternVL checkpoints of every seed family, in either layout.

Families (the LLM and template of each seed checkpoint, at tiny widths):
  internvl2_5            InternViT-300M + Qwen2      template internvl2_5     (InternVL2_5-1B/4B; --awq: 4B-AWQ)
  internvl2_5-internlm2  InternViT-300M + InternLM2  template internvl2_5     (InternVL2_5-8B)
  internvl2              InternViT-300M + InternLM2  template internlm2-chat  (InternVL2-8B)
  internvl-chat-v1_5     InternViT-6B (qk-norm, RMSNorm, no qkv bias) + InternLM2, internlm2-chat (V1-5)

Layouts, written from the same random tensors:
  native    what ``InternVLForConditionalGeneration.from_pretrained(dir)`` loads (InternLM2 as Llama, q/k/v split),
            with a chat_template.jinja rendering like the family's original template;
  original  the OpenGVLab remote-code layout (``vision_model.*``, ``mlp1.*``, ``language_model.*``, InternLM2's
            grouped ``wqkv``, config.json with ``vision_config``/``llm_config``/``template``/``ps_version``).
Both carry sharded fp32 safetensors (+ index), generation_config.json and a byte-level BPE tokenizer trained
offline on a built-in corpus with the family's real special tokens. No network, no multi-GB download.
With ``size="real"`` the same families come at the real checkpoints' shapes (CHECKPOINTS names each one) in bf16,
for load-time and memory benchmarks: random weights drawn in place on ``device``, the tiny tokenizer, the real
vocab_size (the embedding rows past the tokenizer are never looked up by a prompt), 4GB shards.
With ``awq``, the LLM's decoder-layer linears are 4-bit AWQ: the original layout stores them packed
(qweight/qzeros/scales), the native layout stores the same weights dequantized (the reference twin).

Shapes are tiny but the image geometry is real: 448px tiles, 14px patches -> 1024 patches -> 256
tokens per tile after pixel shuffle 0.5, so prompt expansion and tiling are exercised as in production.
Weights are drawn from a seeded torch.Generator with a spread large enough that greedy decoding gives
varied tokens with clear top-1/top-2 margins (fp32 rounding differences between implementations then
do not flip the argmax). Same seed -> byte-identical files.

    python -m tools.make_tiny_checkpoint --out /tmp/tiny-internvl [--family F] [--layout L] [--awq] [--seed 0]
    python -m tools.make_tiny_checkpoint --out /tmp/internvl2_5-4b --family internvl2_5-4b --size real --device cuda
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import sentencepiece
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config

from services.common.tokenizer import sentencepiece_bpe
from services.llm_decoder.models import awq


# Real shapes (reference section 1.2), used with size="real".
# ViT: hidden, layers, heads, intermediate.
VIT_300M, VIT_6B = (1024, 24, 16, 4096), (3200, 45, 25, 12800)
# LLM: hidden, layers, heads, kv heads, intermediate, vocab_size (as InternVL resized it).
QWEN2_5_0_5B = (896, 24, 14, 2, 4864, 151674)
QWEN2_5_3B = (2048, 36, 16, 2, 11008, 151674)
INTERNLM2_5_7B = (4096, 32, 32, 8, 14336, 92553)
INTERNLM2_20B = (6144, 48, 48, 8, 16384, 92553)


@dataclass(frozen=True)
class Family:
    llm: str              # "qwen2" or "internlm2"
    template: str         # the original `template`
    vit_6b: bool = False  # InternViT-6B style: qk-norm, RMSNorm, no qkv bias
    real_llm: tuple = QWEN2_5_0_5B  # the LLM's shapes at size="real" (the ViT's follow vit_6b)


FAMILIES = {
    "internvl2_5": Family("qwen2", "internvl2_5"),
    "internvl2_5-internlm2": Family("internlm2", "internvl2_5", real_llm=INTERNLM2_5_7B),
    "internvl2": Family("internlm2", "internlm2-chat", real_llm=INTERNLM2_5_7B),
    "internvl-chat-v1_5": Family("internlm2", "internlm2-chat", vit_6b=True, real_llm=INTERNLM2_20B),
}
# The seed checkpoints by name, each a family at one real size. At size="tiny" a name writes its family's tiny
# checkpoint, so these add nothing for the tests to cover (InternVL2_5-4B differs from 1B in LLM size only).
CHECKPOINTS = {
    "internvl2_5-1b": FAMILIES["internvl2_5"],
    "internvl2_5-4b": replace(FAMILIES["internvl2_5"], real_llm=QWEN2_5_3B),
    "internvl2_5-8b": FAMILIES["internvl2_5-internlm2"],
    "internvl2-8b": FAMILIES["internvl2"],
    "internvl-chat-v1_5": FAMILIES["internvl-chat-v1_5"],
}
NAMES = FAMILIES | CHECKPOINTS  # what `family` accepts
SIZES = ("tiny", "real")
TOKENIZER_KINDS = ("sentencepiece", "metaspace-first", "metaspace-always")
AWQ_GROUP_SIZE = 32  # real checkpoints use 128; the tiny LLM's 64-wide inputs still get two groups

# Appended after the trained vocabulary, in this order (consecutive ids), like Qwen2.5 + InternVL's additions.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                  "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<video>"]  # fmt: skip
# InternLM2's tokenizer: sentencepiece controls and chat markers (pieces of its model), then InternVL's added tokens.
INTERNLM2_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<img>", "</img>",
                            "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<video>"]
# InternVLProcessor reads these names (and their *_id) from the tokenizer (pitfall 2.3.4).
EXTRA_SPECIAL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                        "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
BPE_VOCAB_SIZE = 1000  # byte alphabet (256) + merges, before the special tokens
SPM_VOCAB_SIZE = 900  # InternLM2-style sentencepiece model, byte pieces included

# Byte-identical to the template the HF converter writes for native InternVL checkpoints (481 bytes):
# image parts -> "<IMG_CONTEXT>\n", video parts -> "<video>\n", no default system message.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2's pre-tokenizer split (single digits, contractions, punctuation runs).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip

CORPUS = """\
The old lighthouse stood at the edge of the harbor, and every evening the keeper climbed the narrow stairs
to light the lamp. Ships that passed in the night could see its beam from many miles away, and sailors
trusted it more than any map. When the storm came in late autumn, the waves rose higher than the rocks,
but the light never failed.
A picture shows a small red boat on a calm blue lake. Two children are sitting in the boat, one holding an
oar and the other pointing at a bird flying over the water. In the background there are green hills, a
wooden house with a white door, and tall trees under a bright sky with a few clouds.
Describe the image in detail. What is the color of the car? How many people are in the photo? Please
answer the question using a single word or phrase. The chart compares the sales of three products over
four years; the first product grew quickly, while the second stayed flat and the third declined.
Scientists study the world by asking questions, making careful observations and testing their ideas with
experiments. A good experiment changes only one thing at a time, so that the result can be explained.
Data from many experiments are collected, measured and shared, and new theories are built on them.
The market opens early in the morning. Farmers bring fresh bread, cheese, apples, oranges, tomatoes and
flowers. People walk between the tables, talk with friends, and carry their baskets home before noon.
In the city, trains and buses move thousands of workers, students and visitors through the streets.
Computers read text as a sequence of tokens. A model learns to predict the next token from the previous
ones, and a vision encoder turns each image into a grid of patch features that the language model can
read together with the words of the prompt. The answer is generated one token at a time.
My grandmother kept a garden behind her kitchen, full of herbs, beans, pumpkins and sunflowers. Each
summer we helped her water the plants, pull weeds and pick berries, which she turned into jam for winter.
She wrote every recipe by hand in a thick notebook that we still keep on the shelf above the stove.
Mountains cover much of the northern region, where rivers carve deep valleys through ancient stone.
Hikers follow marked paths past waterfalls and quiet villages, and in spring the meadows are yellow,
purple and white with wild flowers. Weather changes fast, so travelers should carry warm clothing.
The museum invited visitors to explore its newest exhibition about music, painting and architecture.
Guides explained how artists used light, shadow and perspective, and children joined a workshop where
they built bridges and towers from paper, glue and string. Everyone voted for their favorite design.
0 1 2 3 4 5 6 7 8 9 10 12 25 42 100 256 448 1024 2024 3.14 0.5 1/2 50% $20 #7 (a) [b] {c} <d>
, . ; : ! ? ' " - _ + = * / \\ | @ & ^ ~ ` %
"""


def chat_template(family: Family) -> str:
    """The native template, rendering like the family's original one (internlm2-chat: no newline after <|im_end|>)."""
    return CHAT_TEMPLATE if family.template == "internvl2_5" else CHAT_TEMPLATE.replace("<|im_end|>\n", "<|im_end|>")


def build_tokenizer(family: Family = FAMILIES["internvl2_5"], kind: str = "sentencepiece") -> PreTrainedTokenizerFast:
    """Qwen2 families: byte-level BPE. InternLM2 families: InternLM2's kind, sentencepiece BPE with byte fallback,
    converted to a fast tokenizer either as the serving code converts real InternLM2 checkpoints ("sentencepiece":
    a dummy prefix per text segment) or as transformers' converter writes tokenizer.json ("metaspace-first": the
    prefix only before the input's first segment, its default; "metaspace-always")."""
    if family.llm == "internlm2":
        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "tokenizer.model"
            model.write_bytes(internlm2_sentencepiece())
            tok = sentencepiece_bpe(model, internlm2_added_tokens(), add_bos=True)
        if kind != "sentencepiece":
            tok.normalizer = None
            tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=kind.removeprefix("metaspace-"), split=False)
        extra = {"bos_token": "<s>", "unk_token": "<unk>", "pad_token": "</s>"}
    else:
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)  # no BOS, like Qwen2
        # All 256 bytes are in the alphabet, so any UTF-8 text (e.g. Chinese) round-trips.
        trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, min_frequency=1, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
        tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        extra = {"pad_token": "<|endoftext|>"}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        **extra,
        model_max_length=16384,
        extra_special_tokens=dict(EXTRA_SPECIAL_TOKENS),
    )


@functools.lru_cache(maxsize=1)
def internlm2_sentencepiece() -> bytes:
    """A tiny tokenizer.model like InternLM2's: BPE, byte fallback, <unk> <s> </s>, the chat markers as pieces."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "corpus.txt").write_text(CORPUS)
        sentencepiece.SentencePieceTrainer.train(
            input=f"{tmp}/corpus.txt", model_prefix=f"{tmp}/tok", vocab_size=SPM_VOCAB_SIZE, model_type="bpe",
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
            user_defined_symbols=INTERNLM2_SPECIAL_TOKENS[3:5], normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
            allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2)
        return (Path(tmp) / "tok.model").read_bytes()


def internlm2_added_tokens() -> dict[int, str]:
    """Token ids the tokenizer config lists: the sentencepiece controls and chat markers, then InternVL's tokens."""
    pieces = INTERNLM2_SPECIAL_TOKENS[:5]
    return {i: t for i, t in enumerate(pieces)} | {
        SPM_VOCAB_SIZE + i: t for i, t in enumerate(INTERNLM2_SPECIAL_TOKENS[5:])}


def write_internlm2_tokenizer(out: Path, keep_json: bool) -> None:
    """The original layout's tokenizer files: tokenizer.model and a config naming InternLM2's remote classes
    (plus the converted tokenizer.json when `keep_json`, as re-uploads carry it)."""
    if not keep_json:
        (out / "tokenizer.json").unlink()
    (out / "tokenizer.model").write_bytes(internlm2_sentencepiece())
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, t in internlm2_added_tokens().items()}
    config = {"tokenizer_class": "InternLM2Tokenizer", "add_bos_token": True, "add_eos_token": False,
              "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                             "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
              "added_tokens_decoder": added, "model_max_length": 16384, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_config(vocab_size: int, image_token_id: int, eos_token_id: int,
                 family: Family = FAMILIES["internvl2_5"], size: str = "tiny") -> InternVLConfig:
    """The native config; `vocab_size` is the tokenizer's, which size="real" pads to the real model's."""
    if size == "tiny":
        vit, llm, max_positions = (32, 2, 2, 64), (64, 2, 4, 2, 128, vocab_size), 16384
    elif size == "real":
        vit, llm, max_positions = VIT_6B if family.vit_6b else VIT_300M, family.real_llm, 32768
        assert vocab_size <= llm[5], "every tokenizer id must have an embedding row"
    else:
        raise ValueError(f"unknown size {size!r}")
    vision = InternVLVisionConfig(
        image_size=448, patch_size=14, hidden_size=vit[0], num_hidden_layers=vit[1], num_attention_heads=vit[2],
        intermediate_size=vit[3], attention_bias=not family.vit_6b,
        norm_type="rms_norm" if family.vit_6b else "layer_norm",
        layer_norm_eps=1e-6, use_qk_norm=family.vit_6b, use_mean_pooling=True, hidden_act="gelu")
    common = dict(vocab_size=llm[5], hidden_size=llm[0], num_hidden_layers=llm[1], num_attention_heads=llm[2],
                  num_key_value_heads=llm[3], intermediate_size=llm[4], hidden_act="silu",
                  max_position_embeddings=max_positions, tie_word_embeddings=False, eos_token_id=eos_token_id)
    if family.llm == "qwen2":
        text = Qwen2Config(rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **common)
    else:  # InternLM2 is Llama with other names; dynamic NTK rope x2 as InternLM2.5-7B
        text = LlamaConfig(rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False,
                           rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}, **common)
    # tie_word_embeddings defaults to True at the top level in transformers 5.x: it would tie lm_head to
    # embed_tokens and drop lm_head from the files (pitfall 2.3.1), so set it false at both levels.
    return InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id, image_seq_length=256,
        downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=False)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from one seeded generator, in sorted-name order (reproducible).

    transformers' own init (zeros for cls/pos embeddings, 0.1 layer scale, std 0.02) gives near-flat
    logits and repetitive greedy output, so draw wider distributions instead.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        kind, scale, offset = _spread(name, p)
        draw = torch.rand if kind == "uniform" else torch.randn
        p.copy_(draw(p.shape, generator=g, dtype=torch.float32) * scale + offset)


@torch.no_grad()
def randomize_in_place_(model: torch.nn.Module, seed: int) -> None:
    """randomize_'s distributions drawn in place, in the model's dtype and on its device (fast for billions of
    weights; not the same numbers as randomize_)."""
    g = torch.Generator(model.device).manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        kind, scale, offset = _spread(name, p)
        if kind == "uniform":
            p.uniform_(offset, offset + scale, generator=g)
        else:
            p.normal_(offset, scale, generator=g)


def _spread(name: str, p: torch.Tensor) -> tuple[str, float, float]:
    """How a parameter is drawn: (uniform [0, 1) or normal, scale, offset), value = draw * scale + offset."""
    if "lambda_" in name:  # ViT layer scale
        return "uniform", 0.5, 0.5
    if "norm" in name and name.endswith(".weight"):  # LayerNorm / RMSNorm scales
        return "normal", 0.1, 1.0
    if name.endswith(".bias"):
        return "normal", 0.05, 0.0
    if "cls_token" in name or "position_embeddings" in name or "embed_tokens" in name:
        return "normal", 1.0, 0.0
    # matrices: std ~ 2/sqrt(fan_in), keeps activations O(1) and logits well spread
    return "normal", 2.0 / (p[0].numel() ** 0.5), 0.0


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0, family: str = "internvl2_5", layout: str = "native",
                          awq: bool = False, size: str = "tiny", device: str = "cpu",
                          tokenizer: str = "sentencepiece") -> Path:
    """Write one checkpoint; the same seed, family and size give the same tensors in either layout.

    `size`: "tiny" (fp32, drawn on the CPU: `device` is ignored) or "real" (bf16, drawn on `device`).
    `tokenizer` (InternLM2 families): one of TOKENIZER_KINDS, see `build_tokenizer`."""
    spec = NAMES[family]
    if layout not in ("native", "original"):
        raise ValueError(f"unknown layout {layout!r}")
    if tokenizer not in TOKENIZER_KINDS or (tokenizer != "sentencepiece" and spec.llm != "internlm2"):
        raise ValueError(f"tokenizer {tokenizer!r} is not one of {TOKENIZER_KINDS} for an InternLM2 family")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kind, tokenizer = tokenizer, build_tokenizer(spec, tokenizer)
    special = INTERNLM2_SPECIAL_TOKENS if spec.llm == "internlm2" else SPECIAL_TOKENS
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special}
    config = build_config(len(tokenizer), ids["<IMG_CONTEXT>"], ids["<|im_end|>"], spec, size)
    config.architectures = ["InternVLForConditionalGeneration"]

    if size == "tiny":
        model = InternVLForConditionalGeneration(config).to(torch.float32).eval()
        randomize_(model, seed)  # every saved tensor is a parameter, so this fixes all of them
    else:  # no fp32 build and init on the CPU: allocate bf16 storage on the device, then draw into it
        with torch.device("meta"):
            model = InternVLForConditionalGeneration(config)
        model = model.to(torch.bfloat16).to_empty(device=device).eval()
        randomize_in_place_(model, seed)  # (to_empty leaves the rotary buffers garbage; they are not saved)
    packed = fake_quantize_(model) if awq else {}
    if layout == "native":
        model.generation_config = GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=tokenizer.pad_token_id)
        # Small tiny shards on purpose: the serving loader must handle model.safetensors.index.json + shards.
        model.save_pretrained(out, max_shard_size="300KB" if size == "tiny" else "4GB")
        tokenizer.chat_template = chat_template(spec)
    else:
        write_original(model, config, spec, out, ids, packed)
    for shard in out.glob("*.safetensors"):  # safetensors 0.8 creates files with mode 0600
        shard.chmod(0o644)

    tokenizer.save_pretrained(out)  # writes tokenizer.json, tokenizer_config.json (and chat_template.jinja)
    # 5.x saves tokenizer_class "TokenizersBackend" and flattens the named extra tokens to top-level keys;
    # rewrite to the hub form (PreTrainedTokenizerFast + an extra_special_tokens dict), which 4.5x and 5.x
    # both load with tokenizer.context_image_token(_id) etc. set.
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    tok_cfg.pop("backend", None)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg["extra_special_tokens"] = {k: tok_cfg.pop(k) for k in EXTRA_SPECIAL_TOKENS}
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if layout == "original" and spec.llm == "internlm2":
        write_internlm2_tokenizer(out, keep_json=kind != "sentencepiece")

    # Plain JSON: building GotOcr2ImageProcessor/InternVLProcessor needs torchvision, absent here.
    # GotOcr2's defaults are CLIP 384px (pitfall 2.3.3), so every InternVL value is written out.
    # (GotOcr2 always appends a thumbnail when an image yields >1 tile; there is no config key for it.)
    preprocessor = {
        "image_processor_type": "GotOcr2ImageProcessorFast", "processor_class": "InternVLProcessor",
        "do_resize": True, "size": {"height": 448, "width": 448}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True,
        "crop_to_patches": True, "min_patches": 1, "max_patches": 12,
    }
    processor = {"processor_class": "InternVLProcessor", "image_seq_length": 256}
    for name, obj in (("preprocessor_config.json", preprocessor), ("processor_config.json", processor)):
        (out / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


_AWQ_LINEAR = re.compile(r"^model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


@torch.no_grad()
def fake_quantize_(model: torch.nn.Module) -> dict[str, dict]:
    """Quantize the LLM's decoder-layer linears (what LMDeploy's auto_awq quantizes) to 4-bit AWQ.

    The model keeps the dequantized weights (so the native layout is the exact dense twin); returns the packed
    tensors by parameter name for the original layout.
    """
    packed = {}
    for name, p in model.named_parameters():
        if _AWQ_LINEAR.match(name):
            q = awq.quantize(p, AWQ_GROUP_SIZE)
            p.copy_(awq.dequantize(q["qweight"], q["qzeros"], q["scales"], AWQ_GROUP_SIZE).float())
            packed[name] = q
    return packed


# transformers (in memory) -> original OpenGVLab names, applied in order.
_VISION_TO_ORIGINAL = [
    (r"^model\.vision_tower\.", "vision_model."),
    (r"\.cls_token$", ".class_embedding"),
    (r"\.patch_embeddings\.projection\.", ".patch_embedding."),
    (r"\.position_embeddings$", ".position_embedding"),
    (r"\.encoder\.layer\.", ".encoder.layers."),
    (r"\.lambda_([12])$", r".ls\1"),
    (r"\.attention\.projection_layer\.", ".attn.proj."),
    (r"\.attention\.", ".attn."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"^model\.multi_modal_projector\.layer_norm\.", "mlp1.0."),
    (r"^model\.multi_modal_projector\.linear_1\.", "mlp1.1."),
    (r"^model\.multi_modal_projector\.linear_2\.", "mlp1.3."),
]
_INTERNLM2_NAMES = [
    (r"\.embed_tokens\.", ".tok_embeddings."),
    (r"\.self_attn\.o_proj\.", ".attention.wo."),
    (r"\.mlp\.gate_proj\.", ".feed_forward.w1."),
    (r"\.mlp\.up_proj\.", ".feed_forward.w3."),
    (r"\.mlp\.down_proj\.", ".feed_forward.w2."),
    (r"\.input_layernorm\.", ".attention_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
]


def original_state_dict(model: torch.nn.Module, spec: Family, packed: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The model's tensors under the original layout's names (fused ViT qkv, InternLM2 grouped wqkv, AWQ packing)."""
    text = model.config.text_config
    out, qkv = {}, {}
    for name, t in model.state_dict().items():
        t = t.contiguous()
        if m := re.match(r"^(model\.vision_tower\.encoder\.layer\.\d+\.attention\.)([qkv])_proj\.(\w+)$", name):
            qkv.setdefault((m[1] + "qkv." + m[3], "vision"), {})[m[2]] = t
            continue
        if name.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
            for pattern, repl in _VISION_TO_ORIGINAL:
                name = re.sub(pattern, repl, name)
            out[name] = t
            continue
        name = re.sub(r"^model\.language_model\.", "language_model.model.", name)
        name = re.sub(r"^lm_head\.", "language_model.lm_head.", name)
        if spec.llm == "internlm2":
            if m := re.match(r"^(language_model\.model\.layers\.\d+\.)self_attn\.([qkv])_proj\.weight$", name):
                qkv.setdefault((m[1] + "attention.wqkv.weight", "internlm2"), {})[m[2]] = t
                continue
            for pattern, repl in _INTERNLM2_NAMES:
                name = re.sub(pattern, repl, name)
            name = name.replace("language_model.lm_head.", "language_model.output.")
        source = re.sub(r"^language_model\.model\.", "model.language_model.", name)
        if source in packed:  # AWQ: the packed tensors replace the dense weight
            for key, value in packed[source].items():
                out[name.removesuffix("weight") + key] = value.contiguous()
            continue
        out[name] = t
    for (name, kind), parts in qkv.items():
        if kind == "vision":
            out[name.replace("vision_tower.encoder.layer.", "vision_model.encoder.layers.")
                    .replace(".attention.", ".attn.").removeprefix("model.")] = torch.cat([parts[k] for k in "qkv"])
        else:  # InternLM2 stores q/k/v grouped per KV head: [g query heads, key, value] for each group
            kv, d = text.num_key_value_heads, text.hidden_size // text.num_attention_heads
            g = text.num_attention_heads // kv
            grouped = torch.cat([parts["q"].reshape(kv, g, d, -1), parts["k"].reshape(kv, 1, d, -1),
                                 parts["v"].reshape(kv, 1, d, -1)], dim=1)
            out[name] = grouped.reshape(-1, text.hidden_size).contiguous()
    return out


def write_original(model, config: InternVLConfig, spec: Family, out: Path, ids: dict, packed: dict) -> None:
    tensors = original_state_dict(model, spec, packed)
    names = sorted(tensors)
    dtype = model.dtype  # float32 (tiny) or bfloat16 (real)
    if dtype == torch.float32:  # tiny: three shards, interleaved, so every part spans several files
        shards = [names[i::3] for i in range(3)]
    else:  # real: consecutive shards of at most 4GB, so that no shard has to be built whole in memory
        shards, total = [[]], 0
        for n in names:
            nbytes = tensors[n].nbytes
            if shards[-1] and total + nbytes > 4 << 30:
                shards.append([])
                total = 0
            shards[-1].append(n)
            total += nbytes
    weight_map = {}
    for i, shard_names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].cpu() for n in shard_names}, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_names, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))

    v, t = config.vision_config, config.text_config
    vision = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": v.hidden_size,
              "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
              "intermediate_size": v.intermediate_size, "image_size": 448, "patch_size": 14, "num_channels": 3,
              "qkv_bias": not spec.vit_6b, "qk_normalization": spec.vit_6b, "layer_norm_eps": 1e-6,
              "hidden_act": "gelu", "use_flash_attn": False}
    if not spec.vit_6b:
        vision["norm_type"] = "layer_norm"  # the 6B config leaves it out: the class default is rms_norm
    llm = {"vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "num_hidden_layers": t.num_hidden_layers,
           "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
           "intermediate_size": t.intermediate_size, "max_position_embeddings": t.max_position_embeddings,
           "rms_norm_eps": t.rms_norm_eps, "hidden_act": "silu", "tie_word_embeddings": False,
           "eos_token_id": ids["<|im_end|>"], "torch_dtype": str(dtype).removeprefix("torch.")}
    if spec.llm == "qwen2":
        llm |= {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": 1e6}
    else:
        llm |= {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "rope_theta": 1e6,
                "rope_scaling": {"type": "dynamic", "factor": 2.0}, "bias": False, "bos_token_id": ids["<s>"]}
    if packed:  # LMDeploy writes it through the LLM's config, so it lands inside llm_config
        llm["quantization_config"] = {"quant_method": "awq", "version": "gemm", "bits": 4,
                                      "group_size": AWQ_GROUP_SIZE, "zero_point": True}
    top = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": spec.template,
           "select_layer": -1, "downsample_ratio": 0.5, "ps_version": "v2", "force_image_size": 448,
           "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 12,
           "tie_word_embeddings": False, "vision_config": vision, "llm_config": llm}
    (out / "config.json").write_text(json.dumps(top, indent=2, ensure_ascii=False) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": ids["<|im_end|>"]}) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (same seed -> identical files)")
    parser.add_argument("--family", choices=sorted(NAMES), default="internvl2_5")
    parser.add_argument("--layout", choices=["native", "original"], default="native")
    parser.add_argument("--awq", action="store_true", help="4-bit AWQ LLM linears (W4A16)")
    parser.add_argument("--size", choices=SIZES, default="tiny", help="tiny widths (fp32) or the real shapes (bf16)")
    parser.add_argument("--device", default="cpu", help="where --size real draws the weights (e.g. cuda)")
    parser.add_argument("--tokenizer", choices=TOKENIZER_KINDS, default="sentencepiece",
                        help="InternLM2 families: how the sentencepiece model is converted to tokenizer.json")
    args = parser.parse_args(argv)
    print(write_tiny_checkpoint(args.out, seed=args.seed, family=args.family, layout=args.layout, awq=args.awq,
                                size=args.size, device=args.device, tokenizer=args.tokenizer))


if __name__ == "__main__":
    main()
