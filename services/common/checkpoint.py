"""Reading a checkpoint: where it is, what model it describes, and its tensors (lazily, per service).

One `ModelConfig` describes the model whatever the layout on disk; each service reads only the tensors it runs.
"""
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)

# Files every service needs besides tensors (configs, tokenizer, chat template).
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
    family: str           # which model file runs it, e.g. "qwen2"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    attention_bias: bool
    tie_word_embeddings: bool


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

    def prefixes(self, parts: tuple[str, ...]) -> tuple[str, ...]:
        """Tensor-name prefixes of the parts ("vision": tower + projector, "text": the LLM)."""
        by_part = {"vision": (self.vision_prefix, self.projector_prefix), "text": (self.text_prefix,)}
        return tuple(p for part in parts for p in by_part[part])

    @property
    def tokens_per_tile(self) -> int:
        grid = self.vision.image_size // self.vision.patch_size
        return int(grid * grid * self.downsample_ratio ** 2)


def resolve_checkpoint(model: str, parts: tuple[str, ...] = ("vision", "text")) -> Path:
    """A local directory as is; otherwise a hub id: the metadata, then only the shards holding `parts`' tensors."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import hf_hub_download, snapshot_download

    path = Path(snapshot_download(model, allow_patterns=METADATA_PATTERNS))
    if not parts:
        return path
    prefixes = read_model_config(path).prefixes(parts)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({f for name, f in weight_map.items() if name.startswith(prefixes)})
    else:
        files = ["model.safetensors"]
    for f in files:
        hf_hub_download(model, f)
    return path


def read_model_config(path: Path) -> ModelConfig:
    """Parse config.json (and the tokenizer's image-context id) into the one model description."""
    cfg = json.loads((path / "config.json").read_text())
    model_type = cfg.get("model_type")
    if model_type == "internvl":
        return _native_config(cfg)
    raise ValueError(f"{path}: unsupported checkpoint (config.json model_type={model_type!r}); "
                     "expected a transformers-native InternVL checkpoint (model_type 'internvl')")


def _native_config(cfg: dict) -> ModelConfig:
    v, t = cfg["vision_config"], cfg["text_config"]
    family = t.get("model_type")
    if family != "qwen2":
        raise ValueError(f"unsupported language model family {family!r} (supported: qwen2)")
    image_size = v.get("image_size", [448, 448])
    patch_size = v.get("patch_size", [14, 14])
    heads = t["num_attention_heads"]
    return ModelConfig(
        layout="native",
        vision=VisionConfig(
            hidden_size=v.get("hidden_size", 1024), num_layers=v.get("num_hidden_layers", 24),
            num_heads=v.get("num_attention_heads", 16), intermediate_size=v.get("intermediate_size", 4096),
            image_size=image_size[0] if isinstance(image_size, list) else image_size,
            patch_size=patch_size[0] if isinstance(patch_size, list) else patch_size,
            qkv_bias=v.get("attention_bias", False), qk_norm=v.get("use_qk_norm", False),
            norm_type=v.get("norm_type", "layer_norm"), norm_eps=v.get("layer_norm_eps", 1e-6)),
        text=TextConfig(
            family=family, hidden_size=t["hidden_size"], num_layers=t["num_hidden_layers"], num_heads=heads,
            num_kv_heads=t.get("num_key_value_heads", heads),
            head_dim=t.get("head_dim") or t["hidden_size"] // heads,
            intermediate_size=t["intermediate_size"], vocab_size=t["vocab_size"],
            rms_norm_eps=t.get("rms_norm_eps", 1e-6), rope_theta=_rope_theta(t),
            max_position_embeddings=t.get("max_position_embeddings", 32768),
            attention_bias=True,  # Qwen2 has q/k/v biases
            # transformers 5 defaults to tied heads; a checkpoint that says nothing is tied.
            tie_word_embeddings=cfg.get("tie_word_embeddings", t.get("tie_word_embeddings", True))),
        image_token_id=cfg["image_token_id"],
        downsample_ratio=cfg.get("downsample_ratio", 0.5),
        ps_version="v2",  # the native classes only know the v2 token order
        select_layer=cfg.get("vision_feature_layer", -1),
        max_dynamic_patch=12,
        use_thumbnail=True,
        vision_prefix="vision_tower.", projector_prefix="multi_modal_projector.", text_prefix="language_model.",
    )


def _rope_theta(t: dict) -> float:
    params = t.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"unsupported rope scaling {params!r}")
    return float(params.get("rope_theta", t.get("rope_theta", 10000.0)))


class TensorReader:
    """Lazy access to a checkpoint's safetensors (single file or sharded with an index)."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            single = path / "model.safetensors"
            if not single.exists():
                raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
            with safe_open(single, "pt") as f:
                weight_map = {name: single.name for name in f.keys()}
        self.path, self.weight_map = path, weight_map

    def tensors(self, wanted: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for the wanted names, opening each shard once."""
        by_file: dict[str, list[str]] = {}
        for name, file in self.weight_map.items():
            if wanted(name):
                by_file.setdefault(file, []).append(name)
        for file, names in sorted(by_file.items()):
            with safe_open(self.path / file, "pt") as f:
                for name in names:
                    yield name, f.get_tensor(name)


def load_weights(module: torch.nn.Module, reader: TensorReader, prefix: str,
                 rename: Callable[[str], tuple[str, object] | None]) -> None:
    """Copy the tensors under `prefix` into `module`'s parameters.

    `rename(name_without_prefix)` gives (parameter name, shard id) or None to skip the tensor. A parameter whose
    module has `load_shard` (fused q/k/v, gate/up) is filled shard by shard; every parameter and shard must be filled.
    """
    params = dict(module.named_parameters())
    filled: set[tuple[str, object]] = set()
    for name, tensor in reader.tensors(lambda n: n.startswith(prefix)):
        target = rename(name[len(prefix):])
        if target is None:
            continue
        param_name, shard = target
        if param_name not in params:
            raise ValueError(f"checkpoint tensor {name} maps to unknown parameter {param_name}")
        param, owner = params[param_name], _owner(module, param_name)
        with torch.no_grad():
            if shard is not None:
                owner.load_shard(param, tensor, shard)
            elif param.shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != expected {tuple(param.shape)}")
            else:
                param.copy_(tensor)
        filled.add((param_name, shard))
    expected = {(n, s) for n in params for s in getattr(_owner(module, n), "shards", (None,))}
    missing = sorted(f"{prefix}{n}[{s}]" if s is not None else prefix + n for n, s in expected - filled)
    if missing:
        raise ValueError(f"{reader.path}: checkpoint is missing tensors for {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))


def _owner(module: torch.nn.Module, param_name: str) -> torch.nn.Module:
    return module.get_submodule(param_name.rpartition(".")[0])


def model_fingerprint(path: Path) -> str:
    """Identifies the weights: config plus each tensor file's name and size (cheap, no full read)."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{os.path.getsize(f)}".encode())
    return h.hexdigest()[:16]
