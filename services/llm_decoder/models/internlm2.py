"""InternLM2 / InternLM2.5 (InternVL2-8B, InternVL2.5-8B, InternVL-Chat-V1-5) in the original checkpoint layout.

The same network as Llama; only the names differ, and q/k/v are stored fused in `wqkv`, grouped per KV head.
"""
import re

import torch

from services.llm_decoder.models.llama import LlamaForCausalLM

_RENAMES = [
    (r"^model\.tok_embeddings\.", "model.embed_tokens."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"^output\.", "lm_head."),
]
_GATE_UP = re.compile(r"^(model\.layers\.\d+\.)feed_forward\.w([13])\.(\w+)$")
_WQKV = re.compile(r"^(model\.layers\.\d+\.)attention\.wqkv\.(\w+)$")


def split_wqkv(wqkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """[(H + 2·KV)·d, ...] grouped per KV head as (g query heads, key, value) -> q [H·d, ...], k, v [KV·d, ...]."""
    g = heads // kv_heads
    grouped = wqkv.reshape(kv_heads, g + 2, head_dim, *wqkv.shape[1:])
    q = grouped[:, :g].reshape(heads * head_dim, *wqkv.shape[1:])
    k = grouped[:, g].reshape(kv_heads * head_dim, *wqkv.shape[1:])
    v = grouped[:, g + 1].reshape(kv_heads * head_dim, *wqkv.shape[1:])
    return q, k, v


class InternLM2ForCausalLM(LlamaForCausalLM):
    def checkpoint_name(self, name: str, tensor: torch.Tensor) -> list[tuple[str, object, torch.Tensor]]:
        if m := _WQKV.match(name):
            q, k, v = split_wqkv(tensor, self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim)
            target = f"{m[1]}self_attn.qkv_proj.{m[2]}"
            return [(target, "q", q), (target, "k", k), (target, "v", v)]
        if m := _GATE_UP.match(name):
            return [(f"{m[1]}mlp.gate_up_proj.{m[3]}", "gate" if m[2] == "1" else "up", tensor)]
        for pattern, replacement in _RENAMES:
            name = re.sub(pattern, replacement, name)
        return super().checkpoint_name(name, tensor)
