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

# on_step([(seq, token_id, finish_reason or None), ...]) is called from the engine thread once per step with every
# token the step produced (token -1 and reason "error" when the step failed).
StepCallback = Callable[[list[tuple[Sequence, int, str | None]]], None]


class LLMEngine:
    def __init__(self, model, *, num_blocks: int, block_size: int, max_batched_tokens: int, max_running: int,
                 device: str, dtype: torch.dtype, max_model_len: int | None = None, cuda_graphs: bool = True,
                 on_step: StepCallback | None = None):
        self.blocks = BlockManager(num_blocks, block_size, max_running)
        self.scheduler = Scheduler(self.blocks, max_batched_tokens, max_running)
        self.runner = ModelRunner(model, self.blocks, num_blocks, max_running, max_model_len or num_blocks * block_size,
                                  device, dtype, cuda_graphs)
        self.on_step = on_step
        self.computed_tokens = 0  # tokens run through the model (prefix-cache hits are not)
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

    def num_waiting(self) -> int:
        """Sequences added but not yet running (read from other threads: a momentary count)."""
        return len(self._inbox) + len(self.scheduler.waiting)

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
                    log.exception("engine step failed outside any one sequence; ending the sequences it held")
                    failed = [*self.scheduler.running, *self.scheduler.waiting]
                    for seq in failed:
                        self.scheduler.finish(seq, "error")
                    self.on_step([(seq, -1, "error") for seq in failed])

    def step(self) -> list[tuple[Sequence, int, str | None]]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        out = []
        try:
            tokens = self.runner.step(batch)
        except Exception:
            if len(batch) == 1:
                raise
            # One bad sequence must not fail the others: run them one by one, and end only those that fail alone.
            log.exception("engine step of %d sequences failed; retrying them one by one", len(batch))
            tokens = []
            for item in batch:
                try:
                    tokens += self.runner.step([item])
                except Exception:
                    log.exception("sequence %s fails on its own; ending it", item[0].id)
                    tokens.append(-1)
        self.computed_tokens += sum(n for _, n in batch)
        for (seq, _), token in zip(batch, tokens):
            # -1: a sequence that fails on its own, or whose logits are not finite; its KV blocks are suspect too, so
            # they are not registered.
            if token == -1:
                self.scheduler.finish(seq, "error")
                out.append((seq, -1, "error"))
                continue
            self.blocks.register(seq)
            if token is None:  # a prompt chunk that is not the last
                continue
            seq.token_ids.append(token)
            reason = None
            if token in seq.params.stop_token_ids:
                reason = "stop"
            elif seq.num_output >= seq.params.max_tokens:
                reason = "length"
            if reason:
                self.scheduler.finish(seq, reason)
            out.append((seq, token, reason))
        if out and self.on_step:
            self.on_step(out)
        return out
