"""Write a tiny, random, deterministic InternVL2.5-style checkpoint (InternViT + MLP projector + Qwen2).

The directory is in the transformers-native layout, exactly what
``InternVLForConditionalGeneration.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)``
load: config.json, sharded fp32 safetensors (+ index), generation_config.json, a byte-level BPE
tokenizer trained offline on a built-in corpus, chat_template.jinja, preprocessor_config.json and
processor_config.json. Tests and local runs use it instead of a multi-GB hub download (no network).

Shapes are tiny but the image geometry is real: 448px tiles, 14px patches -> 1024 patches -> 256
tokens per tile after pixel shuffle 0.5, so prompt expansion and tiling are exercised as in production.
Weights are drawn from a seeded torch.Generator with a spread large enough that greedy decoding gives
varied tokens with clear top-1/top-2 margins (fp32 rounding differences between implementations then
do not flip the argmax). Same seed -> byte-identical files.

    python -m tools.make_tiny_checkpoint --out /tmp/tiny-internvl [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config

# Appended after the trained vocabulary, in this order (consecutive ids), like Qwen2.5 + InternVL's additions.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                  "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<video>"]  # fmt: skip
# InternVLProcessor reads these names (and their *_id) from the tokenizer (pitfall 2.3.4).
EXTRA_SPECIAL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                        "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
BPE_VOCAB_SIZE = 1000  # byte alphabet (256) + merges, before the special tokens

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


def build_tokenizer() -> PreTrainedTokenizerFast:
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
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=16384,
        extra_special_tokens=dict(EXTRA_SPECIAL_TOKENS),
    )


def build_config(vocab_size: int, image_token_id: int, eos_token_id: int) -> InternVLConfig:
    vision = InternVLVisionConfig(
        image_size=448, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, attention_bias=True, norm_type="layer_norm", layer_norm_eps=1e-6,
        use_qk_norm=False, use_mean_pooling=True, hidden_act="gelu")
    text = Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, hidden_act="silu", rms_norm_eps=1e-6,
        max_position_embeddings=16384, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=False, eos_token_id=eos_token_id)
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

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std + mean

    for name, p in sorted(model.named_parameters()):
        if "lambda_" in name:  # ViT layer scale
            value = torch.rand(p.shape, generator=g) * 0.5 + 0.5
        elif "norm" in name and name.endswith(".weight"):  # LayerNorm / RMSNorm scales
            value = normal(p.shape, 0.1, mean=1.0)
        elif name.endswith(".bias"):
            value = normal(p.shape, 0.05)
        elif "cls_token" in name or "position_embeddings" in name or "embed_tokens" in name:
            value = normal(p.shape, 1.0)
        else:  # matrices: std ~ 2/sqrt(fan_in), keeps activations O(1) and logits well spread
            value = normal(p.shape, 2.0 / (p[0].numel() ** 0.5))
        p.copy_(value)


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = build_config(len(tokenizer), ids["<IMG_CONTEXT>"], ids["<|im_end|>"])
    config.architectures = ["InternVLForConditionalGeneration"]

    model = InternVLForConditionalGeneration(config).to(torch.float32).eval()
    randomize_(model, seed)  # every saved tensor is a parameter, so this fixes all of them
    model.generation_config = GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    # Small shards on purpose: the serving loader must handle model.safetensors.index.json + shards.
    model.save_pretrained(out, max_shard_size="300KB")
    for shard in out.glob("*.safetensors"):  # safetensors 0.8 creates files with mode 0600
        shard.chmod(0o644)

    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)  # writes tokenizer.json, tokenizer_config.json and chat_template.jinja
    # 5.x saves tokenizer_class "TokenizersBackend" and flattens the named extra tokens to top-level keys;
    # rewrite to the hub form (PreTrainedTokenizerFast + an extra_special_tokens dict), which 4.5x and 5.x
    # both load with tokenizer.context_image_token(_id) etc. set.
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    tok_cfg.pop("backend", None)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg["extra_special_tokens"] = {k: tok_cfg.pop(k) for k in EXTRA_SPECIAL_TOKENS}
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (same seed -> identical files)")
    args = parser.parse_args(argv)
    print(write_tiny_checkpoint(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
