"""What attention needs to know about a flattened batch of sequences, and the paged attention over the KV cache."""
from dataclasses import dataclass

import torch

from services.common.layers import attention


@dataclass
class BatchContext:
    """A step's tokens from several sequences, flattened along one axis.

    query_ranges[i] is sequence i's slice of the flattened tokens; slot_mapping gives each new token's KV slot;
    kv_slots[i] lists the slots of sequence i's whole context (its cached tokens and the new ones), in order.
    """
    query_ranges: list[tuple[int, int]]
    slot_mapping: torch.Tensor
    kv_slots: list[torch.Tensor]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    ctx: BatchContext, scale: float) -> torch.Tensor:
    """q [T, H, d], k/v [T, H_kv, d] for the new tokens; caches [slots, H_kv, d]. Writes k/v, returns [T, H, d]."""
    k_cache[ctx.slot_mapping] = k
    v_cache[ctx.slot_mapping] = v
    out = []
    for (start, end), slots in zip(ctx.query_ranges, ctx.kv_slots):
        out.append(attention(q[None, start:end], k_cache[slots][None], v_cache[slots][None], scale, causal=True)[0])
    return torch.cat(out)
