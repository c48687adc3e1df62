"""Continuous batching with chunked prefill: every step runs the running sequences' next tokens (one per decode, a
chunk of the prompt for a sequence still being prefilled), then admits waiting ones, all within one token budget.
So a long image prompt is prefilled a chunk per step while the other streams keep decoding.

A waiting sequence whose prompt is mostly a prefix that a running one is prefilling right now (several questions
about one image arrive together: the gateway encodes the image once and sends them at the same moment) waits for
those blocks and takes them from the prefix cache, instead of computing the same K/V beside it."""
from collections import deque

from services.llm_decoder.engine.block_manager import BlockManager
from services.llm_decoder.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batched_tokens: int, max_running: int):
        self.blocks, self.max_batched_tokens, self.max_running = blocks, max_batched_tokens, max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.cached_tokens = 0  # prompt tokens taken from the prefix cache instead of computed

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next step's sequences, each with how many of its uncached tokens run in it."""
        budget, batch = self.max_batched_tokens, []
        for seq in list(self.running):  # oldest first
            if seq.status is not Status.RUNNING:  # preempted a moment ago for an older sequence
                continue
            n = min(len(seq) - seq.num_cached, budget)
            if n == 0 or seq.num_output + seq.num_pending >= seq.params.max_tokens:  # its last token is on the way
                continue
            # Without room for its tokens, the newest sequence yields its blocks (possibly this one).
            while not self.blocks.can_grow(seq, seq.num_cached + n):
                self.preempt(self.running[-1])
                if seq.status is not Status.RUNNING:
                    break
            if seq.status is Status.RUNNING:
                self.blocks.grow(seq, seq.num_cached + n)
                batch.append((seq, n))
                budget -= n
        deferred = []
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            hit = self.blocks.reuse_prefix(seq)
            if self._being_prefilled(seq):  # after this step those blocks are cached
                self.blocks.release(seq)
                deferred.append(self.waiting.popleft())
                continue
            n = min(len(seq) - seq.num_cached, budget)
            if not self.blocks.can_grow(seq, seq.num_cached + n):  # admission waits for blocks
                self.blocks.release(seq)
                break
            self.waiting.popleft()
            self.cached_tokens += hit
            if seq.cached_tokens is None:  # a preempted sequence taking back its own blocks is not a reuse
                seq.cached_tokens = hit
            self.blocks.grow(seq, seq.num_cached + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))  # still first in line
        return batch

    def _being_prefilled(self, seq: Sequence) -> bool:
        """Whether a running sequence is prefilling at least half of what `seq` would compute: the full blocks of
        its prompt that follow the ones it took from the cache."""
        size = self.blocks.block_size
        mine = seq.prompt_hashes(size)[0][len(seq.block_table):(len(seq) - 1) // size]
        if not mine:
            return False
        for other in self.running:
            if other.num_cached < other.num_prompt:
                theirs = other.prompt_hashes(size)[1]
                shared = next((i for i, h in enumerate(mine) if h not in theirs), len(mine))
                if 2 * shared * size >= len(seq) - seq.num_cached:
                    return True
        return False

    def preempt(self, seq: Sequence) -> None:
        """Drop a sequence's KV; it goes back to the front of the queue and is prefilled again (its prefix cached
        blocks, if still there, are taken back)."""
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason, seq.num_pending = Status.FINISHED, reason, 0  # a token in flight is dropped
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
