"""Continuous batching with chunked prefill: every step runs the running sequences' next tokens (one per decode, a
chunk of the prompt for a sequence still being prefilled), then admits waiting ones, all within one token budget.
So a long image prompt is prefilled a chunk per step while the other streams keep decoding."""
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
            if n == 0:
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
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            hit = self.blocks.reuse_prefix(seq)
            n = min(len(seq) - seq.num_cached, budget)
            if not self.blocks.can_grow(seq, seq.num_cached + n):  # admission waits for blocks
                self.blocks.release(seq)
                break
            self.waiting.popleft()
            self.cached_tokens += hit
            seq.cached_tokens += hit
            self.blocks.grow(seq, seq.num_cached + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def preempt(self, seq: Sequence) -> None:
        """Drop a sequence's KV; it goes back to the front of the queue and is prefilled again (its prefix cached
        blocks, if still there, are taken back)."""
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
