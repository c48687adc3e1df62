"""Llama-style decoder (the shape Qwen2 and InternLM2 share): flattened tokens in, hidden states out, KV paged.

Family files subclass `LlamaForCausalLM` and only say how their checkpoints name tensors.
"""
import re

import torch
from torch import nn

from services.common.checkpoint import TextConfig
from services.common.layers import FusedLinear, Linear, RMSNorm
from services.llm_decoder.models.awq import AWQLinear
from services.llm_decoder.engine.context import BatchContext, paged_attention

try:
    from services.llm_decoder.engine.triton_rotary import rotary_and_cache as triton_rotary_and_cache
except ImportError:  # Triton comes with CUDA builds of torch
    triton_rotary_and_cache = None


def rotary_cos_sin(positions: torch.Tensor, cfg: TextConfig, dtype: torch.dtype, seq_len: int = 0):
    """cos/sin tables [T, head_dim] for rotate-half rotary embeddings, with linear or dynamic-NTK scaling.

    `seq_len` (dynamic NTK only) is the length of the sequence the positions belong to.
    """
    dim, theta, scaling = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling or {}
    kind, factor = scaling.get("rope_type", scaling.get("type", "default")), scaling.get("factor", 1.0)
    if kind == "dynamic" and seq_len > cfg.max_position_embeddings:
        # NTK: stretch the base once the context outgrows the trained length (identical below it).
        theta *= (factor * seq_len / cfg.max_position_embeddings - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim))
    if kind == "linear":
        inv_freq = inv_freq / factor
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def rotary_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary (rotate-half) of q [T, heads, d] and k [T, kv_heads, d] with cos/sin [T, d], and k, v written to their
    cache slots ([blocks, block_size, kv_heads, d] caches). On the GPU one Triton kernel (q and k rotated in place);
    on the CPU as written. Returns the rotated q and k."""
    if q.is_cuda and triton_rotary_and_cache is not None:
        triton_rotary_and_cache(q, k, v, cos, sin, k_cache, v_cache, slots)
        return q, k
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slots, v)
    return q, k


def linear(cfg: TextConfig, in_features: int, sizes: dict, bias: bool) -> nn.Module:
    """A projection, fused when it has several shards, 4-bit AWQ when the checkpoint is quantized."""
    if cfg.awq_group_size:
        return AWQLinear(in_features, sum(sizes.values()), bias, cfg.awq_group_size, sizes if len(sizes) > 1 else None)
    if len(sizes) > 1:
        return FusedLinear(in_features, sizes, bias)
    return Linear(in_features, sum(sizes.values()), bias=bias)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = linear(cfg, cfg.hidden_size, {"q": q, "k": kv, "v": kv}, bias=cfg.attention_bias)
        self.o_proj = linear(cfg, q, {None: cfg.hidden_size}, bias=False)
        self.k_cache = self.v_cache = torch.empty(0)  # set by the runner once the KV budget is known

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                          self.kv_heads * self.head_dim], dim=-1)
        v = v.view(t, self.kv_heads, self.head_dim)
        q, k = rotary_and_cache(q.view(t, self.heads, self.head_dim), k.view(t, self.kv_heads, self.head_dim), v,
                                cos, sin, self.k_cache, self.v_cache, ctx.slot_mapping)
        out = paged_attention(q, k, v, self.k_cache, self.v_cache, ctx, self.head_dim ** -0.5)
        return self.o_proj(out.reshape(t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = linear(cfg, cfg.hidden_size, {"gate": inter, "up": inter}, bias=False)
        self.down_proj = linear(cfg, inter, {None: cfg.hidden_size}, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x), gated=True)  # of silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, cos, sin, ctx):
        """x: the previous block's output, residual: the stream before it (None at the first layer); returns the same
        pair for the next layer, so each residual add runs fused into the norm after it."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos, sin, ctx), residual)
        return self.mlp(h), residual


class PaddedRows:
    """A vocabulary-sized matrix with its rows padded to a multiple of 64, as vLLM pads them: a logits row of 92,553
    values (InternLM2) or 151,674 (Qwen2.5) is not 16-byte aligned, and cuBLAS then runs its unaligned kernels (the
    7B head took 0.87 ms of a 64-stream decode step on an H200 in one, 2026-11-30). The checkpoint fills the first
    rows (shard "rows"); the rest are zeros, sliced off the logits."""
    shards = ("rows",)

    @staticmethod
    def padded(rows: int) -> int:
        return -(-rows // 64) * 64

    def load_shard(self, param: nn.Parameter, tensor: torch.Tensor, shard: object) -> None:
        rows = tensor.shape[0]
        if rows > param.shape[0] or tensor.shape[1:] != param.shape[1:]:
            raise ValueError(f"shape {tuple(tensor.shape)} does not fit {tuple(param.shape)}")
        param[:rows].copy_(tensor)
        param[rows:].zero_()


class VocabEmbedding(PaddedRows, nn.Embedding):
    def __init__(self, vocab: int, dim: int):
        super().__init__(self.padded(vocab), dim)


class VocabHead(PaddedRows, Linear):
    def __init__(self, dim: int, vocab: int):
        super().__init__(dim, self.padded(vocab), bias=False)


class LlamaModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = VocabHead(cfg.hidden_size, cfg.vocab_size)
        self.tie_weights()
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin of every trained position

    def tie_weights(self) -> None:
        """Share the embedding table with the head when tied (again after `to_empty`, which unties them)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(token_ids)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        """embeds [T, D] (image rows already spliced in), positions [T] -> final hidden states [T, D]."""
        cos, sin = self.rotary(positions, ctx, embeds.dtype)
        x, residual = embeds, None
        for layer in self.model.layers:
            x, residual = layer(x, residual, cos, sin, ctx)
        return self.model.norm(x, residual)[0]

    def rope_is_static(self, max_len: int) -> bool:
        """Whether rotary tables for contexts up to `max_len` come from the precomputed table (dynamic NTK past the
        trained length depends on each sequence's own length instead)."""
        return max_len <= self.cfg.max_position_embeddings

    def rotary(self, positions: torch.Tensor, ctx: BatchContext, dtype: torch.dtype):
        if self.rope_is_static(ctx.max_context_len):
            if self._rope is None or self._rope[0].dtype != dtype or self._rope[0].device != positions.device:
                table = torch.arange(self.cfg.max_position_embeddings, device=positions.device)
                self._rope = rotary_cos_sin(table, self.cfg, dtype)
            return self._rope[0][positions], self._rope[1][positions]
        scaling = self.cfg.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type")) != "dynamic":
            return rotary_cos_sin(positions, self.cfg, dtype)
        # Past the trained length, dynamic NTK depends on each sequence's own length: one table per sequence.
        tables = [rotary_cos_sin(positions[start:end], self.cfg, dtype, seq_len=int(positions[end - 1]) + 1)
                  for start, end in ctx.query_ranges]
        return torch.cat([c for c, _ in tables]), torch.cat([s for _, s in tables])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)[..., :self.cfg.vocab_size].float()

    def kv_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.model.layers]

    _FUSED = re.compile(r"^(model\.layers\.\d+\.)(self_attn\.([qkv])_proj|mlp\.(gate|up)_proj)\.(\w+)$")

    def checkpoint_name(self, name: str, tensor: torch.Tensor) -> list[tuple[str, object, torch.Tensor]]:
        """transformers (Llama/Qwen2) tensor name under the LLM prefix -> (parameter, shard, tensor)."""
        if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return []
        if name in ("lm_head.weight", "model.embed_tokens.weight"):
            return [(name, "rows", tensor)]
        m = self._FUSED.match(name)
        if m is None:
            return [(name, None, tensor)]
        if m[3]:
            return [(f"{m[1]}self_attn.qkv_proj.{m[5]}", m[3], tensor)]
        return [(f"{m[1]}mlp.gate_up_proj.{m[5]}", m[4], tensor)]
