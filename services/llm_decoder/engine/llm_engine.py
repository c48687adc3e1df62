"""The loop tying scheduler and runner: one thread steps the engine; callers add and abort sequences."""
import logging
import threading
from typing import Callable

import torch

from services.llm_decoder.engine.block_manager import BlockManager
from services.llm_decoder.engine.model_runner import ModelRunner
from services.llm_decoder.engine.scheduler import Scheduler
from services.llm_decoder.engine.sequence import Sequence

log = logging.getLogger(__name__)

# on_token(seq, token_id, finish_reason or None) is called from the engine thread after every step.
TokenCallback = Callable[[Sequence, int, str | None], None]


class LLMEngine:
    def __init__(self, model, image_token_id: int, *, num_blocks: int, block_size: int, max_batched_tokens: int,
                 max_running: int, device: str, dtype: torch.dtype, on_token: TokenCallback | None = None):
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_batched_tokens, max_running)
        self.runner = ModelRunner(model, image_token_id, self.blocks, num_blocks, device, dtype)
        self.on_token = on_token
        self._inbox: list[Sequence] = []
        self._aborts: set[str] = set()
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, seq: Sequence) -> None:
        with self._wake:
            self._inbox.append(seq)
            self._wake.notify()

    def abort(self, seq_id: str) -> None:
        """Stop a sequence at the next step boundary and free its blocks (the caller went away)."""
        with self._wake:
            self._aborts.add(seq_id)
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._inbox or self._aborts or self.scheduler.has_work()):
                    self._wake.wait()
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, set()
            for seq in inbox:
                self.scheduler.add(seq)
            if aborts:
                for seq in [s for s in (*self.scheduler.running, *self.scheduler.waiting) if s.id in aborts]:
                    self.scheduler.finish(seq, "abort")
            if self.scheduler.has_work():
                try:
                    self.step()
                except Exception:  # the loop must outlive any failure, or every caller would hang
                    log.exception("engine step failed; ending the sequences it held")
                    for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                        self.scheduler.finish(seq, "error")
                        self.on_token(seq, -1, "error")

    def step(self) -> None:
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return
        tokens = self.runner.step(seqs, is_prefill)
        for seq, token in zip(seqs, tokens):
            seq.output_ids.append(token)
            reason = None
            if token in seq.params.stop_token_ids:
                reason = "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens:
                reason = "length"
            if reason:
                self.scheduler.finish(seq, reason)
            self.on_token(seq, token, reason)
