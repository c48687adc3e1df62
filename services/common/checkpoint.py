"""Reading a checkpoint: where it is and what model it describes (no torch: the gateway uses it too).

One `ModelConfig` describes the model whatever the layout on disk; `weights.py` reads the tensors.
"""
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

class CheckpointError(ValueError):
    """A checkpoint this server cannot serve (unknown family, missing tensors or files, unsupported options)."""


# Files every service needs besides tensors: configs, tokenizer, chat template. (No remote code: none is run.)
METADATA_PATTERNS = ["*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    qkv_bias: bool
    qk_norm: bool
    norm_type: str        # "layer_norm" or "rms_norm"
    norm_eps: float


@dataclass(frozen=True)
class TextConfig:
    family: str           # which model file runs it: "qwen2", "llama" or "internlm2"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None     # {"rope_type": "dynamic" | "linear", "factor": f} or None
    max_position_embeddings: int
    attention_bias: bool
    tie_word_embeddings: bool
    awq_group_size: int = 0       # > 0: linear layers are 4-bit AWQ (W4A16) with this group size


@dataclass(frozen=True)
class ModelConfig:
    layout: str           # "native" (transformers) or "original" (OpenGVLab remote code)
    vision: VisionConfig
    text: TextConfig
    image_token_id: int
    downsample_ratio: float
    ps_version: str       # pixel-shuffle token order: "v1" (column-major) or "v2"
    select_layer: int
    max_dynamic_patch: int
    use_thumbnail: bool
    vision_prefix: str    # tensor-name prefixes of the three parts in this layout
    projector_prefix: str
    text_prefix: str
    template: str | None = None   # original layout: the conversation template the checkpoint names
    template_era: str = "2.0"     # "1.5": InternVL-Chat-V1-5's conversation.py (other system message)

    def prefixes(self, parts: tuple[str, ...]) -> tuple[str, ...]:
        """Tensor-name prefixes of the parts ("vision": tower + projector, "text": the LLM)."""
        by_part = {"vision": (self.vision_prefix, self.projector_prefix), "text": (self.text_prefix,)}
        return tuple(p for part in parts for p in by_part[part])

    @property
    def tokens_per_tile(self) -> int:
        grid = self.vision.image_size // self.vision.patch_size
        return int(grid * grid * self.downsample_ratio ** 2)


# Native checkpoints come with either of the prefix sets transformers has written (its conversion script changed);
# both are read as the save_pretrained form.
_NATIVE_ALIASES = [("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                   ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")]
# (sharded index, single file): safetensors, else PyTorch pickles (InternVL2_5-4B-AWQ's main branch has only those).
WEIGHT_FILES = [("model.safetensors.index.json", "model.safetensors"),
                ("pytorch_model.bin.index.json", "pytorch_model.bin")]


def canonical_name(name: str) -> str:
    for old, new in _NATIVE_ALIASES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def resolve_checkpoint(model: str, parts: tuple[str, ...] = ("vision", "text")) -> Path:
    """A local directory as is; otherwise a hub id: the metadata, then only the shards holding `parts`' tensors."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    path = Path(snapshot_download(model, allow_patterns=METADATA_PATTERNS))
    if not parts:
        return path
    prefixes = read_model_config(path).prefixes(parts)
    for index_name, _ in WEIGHT_FILES:
        if (path / index_name).exists():
            weight_map = json.loads((path / index_name).read_text())["weight_map"]
            for f in sorted({f for name, f in weight_map.items() if canonical_name(name).startswith(prefixes)}):
                hf_hub_download(model, f)
            return path
    for _, single_name in WEIGHT_FILES:
        try:
            hf_hub_download(model, single_name)
            return path
        except EntryNotFoundError:
            continue
    raise CheckpointError(f"{model}: no safetensors or pytorch_model.bin weights")


def read_model_config(path: Path) -> ModelConfig:
    """Parse config.json (either layout) into the one model description."""
    cfg = json.loads((path / "config.json").read_text())
    model_type = cfg.get("model_type")
    if model_type == "internvl":
        return _native_config(cfg, path)
    if model_type == "internvl_chat":
        return _original_config(cfg, path)
    raise CheckpointError(f"{path}: unsupported checkpoint (config.json model_type={model_type!r}); expected an "
                          "InternVL checkpoint: 'internvl_chat' (OpenGVLab layout) or 'internvl' (transformers layout)")


# LLM architecture -> model file. Native InternLM2-based checkpoints say model_type "llama" (converted names).
_ORIGINAL_FAMILIES = {"Qwen2ForCausalLM": "qwen2", "InternLM2ForCausalLM": "internlm2", "LlamaForCausalLM": "llama"}
_NATIVE_FAMILIES = ("qwen2", "llama")


def _native_config(cfg: dict, path: Path) -> ModelConfig:
    v, t = cfg["vision_config"], cfg["text_config"]
    # The tile limit lives in the image processor's config (GotOcr2: max_patches; it always adds the thumbnail). Its
    # crop_to_patches is not read: InternVLProcessor passes crop_to_patches=True to it on every call.
    processor = path / "preprocessor_config.json"
    max_patches = json.loads(processor.read_text()).get("max_patches", 12) if processor.exists() else 12
    family = t.get("model_type")
    if family not in _NATIVE_FAMILIES:
        raise CheckpointError(f"unsupported language model family {family!r} "
                              f"(supported: {', '.join(_NATIVE_FAMILIES)})")
    image_size = v.get("image_size", [448, 448])
    patch_size = v.get("patch_size", [14, 14])
    return ModelConfig(
        layout="native",
        vision=VisionConfig(
            hidden_size=v.get("hidden_size", 1024), num_layers=v.get("num_hidden_layers", 24),
            num_heads=v.get("num_attention_heads", 16), intermediate_size=v.get("intermediate_size", 4096),
            image_size=image_size[0] if isinstance(image_size, list) else image_size,
            patch_size=patch_size[0] if isinstance(patch_size, list) else patch_size,
            qkv_bias=v.get("attention_bias", False), qk_norm=v.get("use_qk_norm", False),
            norm_type=v.get("norm_type", "layer_norm"), norm_eps=v.get("layer_norm_eps", 1e-6)),
        # transformers 5 defaults to tied heads; a checkpoint that says nothing is tied.
        text=_text_config(t, family, tie=cfg.get("tie_word_embeddings", t.get("tie_word_embeddings", True))),
        image_token_id=cfg["image_token_id"],
        downsample_ratio=cfg.get("downsample_ratio", 0.5),
        ps_version="v2",  # the native classes only know the v2 token order
        select_layer=cfg.get("vision_feature_layer", -1),
        max_dynamic_patch=max_patches,
        use_thumbnail=True,
        vision_prefix="vision_tower.", projector_prefix="multi_modal_projector.", text_prefix="language_model.",
    )


def _original_config(cfg: dict, path: Path) -> ModelConfig:
    v, t = cfg["vision_config"], cfg["llm_config"]
    arch = (t.get("architectures") or ["?"])[0]
    if arch not in _ORIGINAL_FAMILIES:
        raise CheckpointError(f"unsupported language model {arch!r} (supported: {', '.join(_ORIGINAL_FAMILIES)})")
    family = _ORIGINAL_FAMILIES[arch]
    vision = VisionConfig(
        hidden_size=v["hidden_size"], num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
        intermediate_size=v["intermediate_size"], image_size=v.get("image_size", 448),
        patch_size=v.get("patch_size", 14), qkv_bias=v.get("qkv_bias", False),
        qk_norm=v.get("qk_normalization", False),
        norm_type=v.get("norm_type", "rms_norm"),  # the InternViT class default; the 6B config leaves it out
        norm_eps=v.get("layer_norm_eps", 1e-6))
    return ModelConfig(
        layout="original",
        vision=vision,
        # InternVLChatConfig forces untied heads. LMDeploy writes an AWQ config inside llm_config; accept it on top.
        text=_text_config(t, family, tie=False, quantization=cfg.get("quantization_config")),
        image_token_id=_token_id(path, "<IMG_CONTEXT>"),
        downsample_ratio=cfg.get("downsample_ratio", 0.5),
        ps_version=cfg.get("ps_version", "v1"),  # the original code's default when the key is absent
        select_layer=cfg.get("select_layer", -1),
        # Trained without dynamic tiling: one resized tile (the cards' dynamic_preprocess with max_num=1).
        max_dynamic_patch=cfg.get("max_dynamic_patch", 12) if cfg.get("dynamic_image_size", True) else 1,
        use_thumbnail=cfg.get("use_thumbnail", True),
        vision_prefix="vision_model.", projector_prefix="mlp1.", text_prefix="language_model.",
        template=cfg.get("template"),
        # InternVL-Chat-V1-5, the one InternViT-6B checkpoint, ships the 1.5-era conversation.py.
        template_era="1.5" if vision.qk_norm else "2.0",
    )


def _text_config(t: dict, family: str, tie: bool, quantization: dict | None = None) -> TextConfig:
    heads = t["num_attention_heads"]
    quant = t.get("quantization_config") or quantization or {}
    group = quant.get("group_size", 128)
    # The layout LMDeploy and AutoAWQ write by default. AutoAWQ's "gemv" packs along the other dimension (a shape error
    # deep in loading, or none for a square projection), and without zero points there are no qzeros.
    if quant and (quant.get("quant_method") != "awq" or quant.get("bits", 4) != 4
                  or str(quant.get("version", "gemm")).lower() != "gemm" or quant.get("zero_point", True) is not True
                  or type(group) is not int or group <= 0):
        raise CheckpointError(f"unsupported quantization {quant!r} (supported: 4-bit AWQ in the GEMM layout, with "
                              "zero points and a positive group size)")
    params = t.get("rope_parameters") or {}
    return TextConfig(
        family=family, hidden_size=t["hidden_size"], num_layers=t["num_hidden_layers"], num_heads=heads,
        num_kv_heads=t.get("num_key_value_heads") or heads,
        head_dim=t.get("head_dim") or t["hidden_size"] // heads,
        intermediate_size=t["intermediate_size"], vocab_size=t["vocab_size"],
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=float(params.get("rope_theta", t.get("rope_theta", 10000.0))),
        rope_scaling=_rope_scaling(params or t.get("rope_scaling")),
        max_position_embeddings=t.get("max_position_embeddings", 32768),
        # Qwen2 always has q/k/v biases; InternLM2 says `bias`, Llama `attention_bias`.
        attention_bias=family == "qwen2" or t.get("bias", t.get("attention_bias", False)),
        tie_word_embeddings=tie,
        awq_group_size=group if quant else 0)


def _rope_scaling(params: dict | None) -> dict | None:
    kind = (params or {}).get("rope_type", (params or {}).get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("dynamic", "linear"):
        raise CheckpointError(f"unsupported rope scaling {params!r} (supported: dynamic, linear)")
    return {"rope_type": kind, "factor": float(params["factor"])}


def _token_id(path: Path, token: str) -> int:
    """An added token's id from the tokenizer files (original checkpoints do not put it in config.json)."""
    tokenizer_json = path / "tokenizer.json"
    if tokenizer_json.exists():
        for added in json.loads(tokenizer_json.read_text()).get("added_tokens", []):
            if added["content"] == token:
                return added["id"]
    config = path / "tokenizer_config.json"
    if config.exists():
        for token_id, added in json.loads(config.read_text()).get("added_tokens_decoder", {}).items():
            if added["content"] == token:
                return int(token_id)
    raise CheckpointError(f"{path}: the tokenizer has no {token} token")


def checkpoint_id(path: Path) -> str:
    """Identifies the checkpoint, the same in every pool although each downloads only its own shards.

    The config, the shard index (which names every file and tensor) or, unsharded, the weight file's size, and the hub
    revision when the checkpoint came from the hub. (The weights themselves: `weights.weights_fingerprint`.)
    """
    h = hashlib.sha256((path / "config.json").read_bytes())
    hub = path.parent.name == "snapshots"  # huggingface_hub's cache: the folder is named after the commit
    if hub:
        h.update(path.name.encode())
    for index_name, single_name in WEIGHT_FILES:
        if (path / index_name).exists():
            h.update((path / index_name).read_bytes())
            break
        # From the hub the revision names the file already, and the gateway (metadata only) has no weight file.
        if not hub and (path / single_name).exists():
            h.update(f"{single_name}:{os.path.getsize(path / single_name)}".encode())
            break
    return h.hexdigest()[:16]
