"""InternViT (300M and 6B variants) + pixel shuffle + MLP projector: uint8 tiles in, LLM-width embeddings out."""
import re

import torch
import torch.nn.functional as F
from torch import nn

from services.common.checkpoint import ModelConfig, VisionConfig
from services.common.layers import FusedLinear, RMSNorm, attention

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _norm(cfg: VisionConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, cfg.norm_eps) if cfg.norm_type == "rms_norm" else nn.LayerNorm(dim, eps=cfg.norm_eps)


class PatchEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.projection = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        patches = (cfg.image_size // cfg.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embeddings = PatchEmbeddings(cfg)
        self.position_embeddings = nn.Parameter(torch.zeros(1, patches + 1, cfg.hidden_size))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings.projection(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position_embeddings


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, c // cfg.num_heads
        self.qkv = FusedLinear(c, {"q": c, "k": c, "v": c}, bias=cfg.qkv_bias)
        # The 6B tower normalizes q and k over the full width (all heads at once).
        self.q_norm = RMSNorm(c, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(c, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.projection_layer = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(b, s, self.num_heads, self.head_dim) for t in (q, k, v))
        out = attention(q, k, v, scale=self.head_dim ** -0.5, causal=False)
        return self.projection_layer(out.reshape(b, s, c))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.mlp = MLP(cfg)
        self.layernorm_before = _norm(cfg, cfg.hidden_size)
        self.layernorm_after = _norm(cfg, cfg.hidden_size)
        self.lambda_1 = nn.Parameter(torch.ones(cfg.hidden_size))  # layer scale
        self.lambda_2 = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.lambda_1 * self.attention(self.layernorm_before(x))
        return x + self.lambda_2 * self.mlp(self.layernorm_after(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))


class InternViT(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, pixels: torch.Tensor, select_layer: int) -> torch.Tensor:
        x = self.embeddings(pixels)
        layers = self.encoder.layer
        # select_layer indexes (embeddings, layer 1, ..., layer N): -1 is the last layer's output.
        for layer in layers[:len(layers) + 1 + select_layer if select_layer < 0 else select_layer]:
            x = layer(x)
        return x


class Projector(nn.Module):
    """mlp1: LayerNorm -> Linear -> GELU -> Linear, from 4x the ViT width to the LLM width."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_dim)
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(self.layer_norm(x))))


def pixel_shuffle(x: torch.Tensor, ratio: float, version: str) -> torch.Tensor:
    """[n, h, w, c] -> [n, h*ratio * w*ratio, c/ratio^2]; each token holds a 2x2 patch block.

    v2 emits tokens row-major; v1 (the original code before the fix) emits the same tokens column-major.
    """
    n, h, w, c = x.shape
    x = x.reshape(n, h, int(w * ratio), int(c / ratio))                 # fold column pairs into channels
    x = x.permute(0, 2, 1, 3).reshape(n, int(w * ratio), int(h * ratio), int(c / ratio ** 2))  # then row pairs
    if version == "v2":
        x = x.permute(0, 2, 1, 3)
    return x.reshape(n, -1, x.shape[-1])


class InternVisionModel(nn.Module):
    """Vision tower + projector. Parameter names follow the transformers-native layout (q/k/v fused)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        v = cfg.vision
        self.cfg = cfg
        self.vision_tower = InternViT(v)
        self.projector = Projector(int(v.hidden_size / cfg.downsample_ratio ** 2), cfg.text.hidden_size)
        # Device tensors made once, not per call: a CUDA graph cannot capture the copy that creates them.
        self.register_buffer("pixel_mean", torch.empty(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.empty(1, 3, 1, 1), persistent=False)
        self.init_pixel_stats()

    def init_pixel_stats(self) -> None:
        """Fill the normalisation constants in float32 (after `to_empty`, which leaves buffers unset, and after
        `.to(dtype)`, which would round them)."""
        device = self.pixel_mean.device
        self.pixel_mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.pixel_std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def normalize(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 [n, H, W, 3] -> normalized [n, 3, H, W] in the model dtype, in the cards' order (float32 first)."""
        x = (tiles.permute(0, 3, 1, 2).float().div(255) - self.pixel_mean) / self.pixel_std
        return x.to(self.projector.linear_1.weight.dtype)

    @torch.no_grad()  # not inference_mode: torch.compile fails on it (inference tensors' version counters)
    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 tiles [n, H, W, 3] -> embeddings [n * tokens_per_tile, llm_hidden]."""
        x = self.vision_tower(self.normalize(tiles), self.cfg.select_layer)[:, 1:]  # drop CLS
        side = int(x.shape[1] ** 0.5)
        x = pixel_shuffle(x.reshape(x.shape[0], side, side, -1), self.cfg.downsample_ratio, self.cfg.ps_version)
        return self.projector(x).reshape(-1, self.cfg.text.hidden_size)


_NATIVE_QKV = re.compile(r"^(encoder\.layer\.\d+\.attention\.)([qkv])_proj\.(weight|bias)$")


def native_vision_name(name: str, tensor: torch.Tensor) -> list[tuple[str, object, torch.Tensor]]:
    """transformers tensor name under `vision_tower.` -> (parameter, shard, tensor): only q/k/v are fused here."""
    if m := _NATIVE_QKV.match(name):
        return [(f"{m[1]}qkv.{m[3]}", m[2], tensor)]
    return [(name, None, tensor)]


# Original (OpenGVLab) names -> ours, applied in order to names under `vision_model.`.
_ORIGINAL_RENAMES = [
    (r"^embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"^embeddings\.patch_embedding\.", "embeddings.patch_embeddings.projection."),
    (r"^embeddings\.position_embedding$", "embeddings.position_embeddings"),
    (r"^encoder\.layers\.", "encoder.layer."),
    (r"\.ls([12])$", r".lambda_\1"),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
]
_ORIGINAL_PROJECTOR = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}


def original_vision_name(name: str, tensor: torch.Tensor) -> list[tuple[str, object, torch.Tensor]]:
    """OpenGVLab tensor name under `vision_model.` -> (parameter, shard, tensor); `attn.qkv` rows are q, k, v."""
    for pattern, replacement in _ORIGINAL_RENAMES:
        name = re.sub(pattern, replacement, name)
    if ".attention.qkv." in name:
        return [(name, shard, part) for shard, part in zip("qkv", tensor.chunk(3))]
    return [(name, None, tensor)]


def original_projector_name(name: str, tensor: torch.Tensor) -> list[tuple[str, object, torch.Tensor]]:
    """`mlp1.{0,1,3}.*` (a Sequential with the GELU at index 2) -> our projector's names."""
    index, _, rest = name.partition(".")
    return [(f"{_ORIGINAL_PROJECTOR[index]}.{rest}", None, tensor)]
