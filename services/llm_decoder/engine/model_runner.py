"""Tensors in, next tokens out: builds a step's flattened inputs, splices image rows, runs the model, samples."""
import torch

from services.llm_decoder.engine.block_manager import BlockManager
from services.llm_decoder.engine.context import BatchContext
from services.llm_decoder.engine.sampler import sample
from services.llm_decoder.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model, image_token_id: int, blocks: BlockManager, num_blocks: int, device: str,
                 dtype: torch.dtype):
        self.model, self.image_token_id, self.blocks, self.device = model, image_token_id, blocks, device
        slots = num_blocks * blocks.block_size
        for attn in model.kv_layers():
            attn.k_cache = torch.zeros(slots, attn.kv_heads, attn.head_dim, device=device, dtype=dtype)
            attn.v_cache = torch.zeros_like(attn.k_cache)

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        """Run one step for `seqs`: the uncached tokens of each (whole prompt on prefill, last token on decode)."""
        ids, positions, slot_mapping, ranges, kv_slots, images, in_prompt = [], [], [], [], [], [], []
        for seq in seqs:
            start, end = seq.num_cached, len(seq)
            ranges.append((len(ids), len(ids) + end - start))
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            in_prompt.extend(p < len(seq.prompt_ids) for p in range(start, end))
            slots = self.blocks.slots(seq, 0, end)
            slot_mapping.append(slots[start:])
            kv_slots.append(slots.to(self.device))
            if is_prefill and seq.image_embeds is not None:
                images.append(seq.image_embeds)
            seq.num_cached = end
        token_ids = torch.tensor(ids, device=self.device)
        embeds = self.model.embed(token_ids)
        if images:
            # Only prompt positions take image rows: a generated image-context token is an ordinary token.
            mask = (token_ids == self.image_token_id) & torch.tensor(in_prompt, device=self.device)
            embeds = splice_image_embeddings(embeds, mask, images)
        ctx = BatchContext(ranges, torch.cat(slot_mapping).to(self.device), kv_slots)
        hidden = self.model(embeds, torch.tensor(positions, device=self.device), ctx)
        last = torch.tensor([end - 1 for _, end in ranges], device=self.device)
        return sample(self.model.logits(hidden[last]), seqs)


def splice_image_embeddings(embeds: torch.Tensor, mask: torch.Tensor, images: list[torch.Tensor]) -> torch.Tensor:
    """Replace the rows at the masked (image-context) positions, in order, with the images' rows.

    The decoder's servicer has already checked that the counts agree.
    """
    rows = torch.cat(images).to(embeds.device, embeds.dtype)
    embeds = embeds.clone()
    embeds[mask] = rows
    return embeds
