"""Paged KV cache bookkeeping with prefix caching: fixed-size blocks handed to sequences as they grow.

A full block is registered under a hash chained over its tokens and everything before it (`Sequence.block_key`), so a
later prompt with the same prefix (a system prompt, a second turn about the same image) takes the block instead of
computing it again. Blocks are reference-counted; a block nobody holds stays cached in the free list, whose order is
least-recently-released first, and loses its hash only when it is handed out again.
"""
from collections import OrderedDict

from services.llm_decoder.engine.sequence import Sequence


class Block:
    __slots__ = ("id", "ref", "hash", "key")

    def __init__(self, block_id: int):
        self.id, self.ref, self.hash, self.key = block_id, 0, None, None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, max_rows: int):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        # Each running sequence owns a row of the runner's device block table while it holds blocks.
        self.free_rows = list(range(max_rows - 1, -1, -1))

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` enough blocks to hold `num_tokens` tokens."""
        if seq.row < 0:
            seq.row = self.free_rows.pop()
        for _ in range(self.blocks_needed(seq, num_tokens)):
            block = self.blocks[self.free.popitem(last=False)[0]]
            self._uncache(block)
            block.ref = 1
            seq.block_table.append(block.id)

    def reuse_prefix(self, seq: Sequence) -> int:
        """On admission: take the cached blocks of the sequence's prefix (never the block of its last token, which
        must run to give the next token's logits)."""
        prev = seq.block_hashes[-1] if seq.block_hashes else 0
        for index in range(len(seq.block_table), (len(seq) - 1) // self.block_size):
            key = seq.block_key(index, self.block_size, prev)
            block_id = self.cached.get(hash(key))
            if block_id is None or self.blocks[block_id].key != key:
                break
            block = self.blocks[block_id]
            if block.ref == 0:
                del self.free[block_id]
            block.ref += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(prev := block.hash)
        if seq.row < 0 and seq.block_table:
            seq.row = self.free_rows.pop()
        hit = len(seq.block_table) * self.block_size - seq.num_cached
        seq.num_cached += hit
        return hit

    def register(self, seq: Sequence) -> None:
        """Hash the blocks that are now full, computed (or being computed: whoever takes them runs after the step
        that writes them) and whose tokens are all known (not one still on its way back), so later prompts can take
        them."""
        prev = seq.block_hashes[-1] if seq.block_hashes else 0
        for index in range(len(seq.block_hashes), min(seq.num_cached, len(seq.token_ids)) // self.block_size):
            key = seq.block_key(index, self.block_size, prev)
            prev = hash(key)
            block = self.blocks[seq.block_table[index]]
            if block.hash is None and prev not in self.cached:
                block.hash, block.key = prev, key
                self.cached[prev] = block.id
            seq.block_hashes.append(prev)

    def forget(self, seq: Sequence) -> None:
        """Take the sequence's blocks out of the prefix cache (its K/V turned out not finite)."""
        for block_id in seq.block_table:
            self._uncache(self.blocks[block_id])

    def _uncache(self, block: Block) -> None:
        if block.hash is not None and self.cached.get(block.hash) == block.id:
            del self.cached[block.hash]
        block.hash = block.key = None

    def clear_cache(self) -> None:
        """Forget every cached block (the engine's warm-up leaves none)."""
        for block in self.blocks:
            block.hash = block.key = None
        self.cached.clear()

    def release(self, seq: Sequence) -> None:
        # Last blocks first, so a prefix's head stays cached longest (its tail is useless without it).
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref -= 1
            if block.ref == 0:
                self.free[block_id] = None
        if seq.row >= 0:
            self.free_rows.append(seq.row)
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_cached, seq.row, seq.synced_blocks = 0, -1, 0
