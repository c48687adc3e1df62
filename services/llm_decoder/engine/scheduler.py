"""Continuous batching: new sequences are prefilled as soon as KV blocks allow, then decode with the running ones."""
from collections import deque

from services.llm_decoder.engine.block_manager import BlockManager
from services.llm_decoder.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batched_tokens: int, max_running: int):
        self.blocks, self.max_batched_tokens, self.max_running = blocks, max_batched_tokens, max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences of the next step and whether it is a prefill step."""
        prefill, tokens = [], 0
        while self.waiting and len(self.running) + len(prefill) < self.max_running:
            seq = self.waiting[0]
            # A prompt longer than the token budget still runs, alone.
            if prefill and tokens + len(seq) > self.max_batched_tokens:
                break
            if not self.blocks.can_grow(seq, len(seq)):
                break
            self.waiting.popleft()
            self.blocks.grow(seq, len(seq))
            seq.status = Status.RUNNING
            prefill.append(seq)
            tokens += len(seq)
        if prefill:
            self.running.extend(prefill)
            return prefill, True
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:  # preempted a moment ago for an older sequence
                continue
            # Room for the token this step appends; without it, the newest sequence yields its blocks.
            while not self.blocks.can_grow(seq, len(seq)):
                self.preempt(self.running[-1])
                if seq.status is not Status.RUNNING:
                    break
            if seq.status is Status.RUNNING:
                self.blocks.grow(seq, len(seq))
        return list(self.running), False

    def preempt(self, seq: Sequence) -> None:
        """Drop a sequence's KV; it goes back to the front of the queue and is prefilled again."""
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
