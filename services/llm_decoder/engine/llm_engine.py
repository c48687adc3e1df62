"""The loop tying scheduler and runner: one thread steps the engine; callers add and abort sequences."""
import logging
import threading
from typing import Callable

import torch

from services.llm_decoder.engine.block_manager import BlockManager
from services.llm_decoder.engine.model_runner import Launched, ModelRunner
from services.llm_decoder.engine.scheduler import Scheduler
from services.llm_decoder.engine.sequence import SamplingParams, Sequence, Status

log = logging.getLogger(__name__)

# (sequence, token id, finish reason or None); token -1 with reason "error" when its step failed.
Output = tuple[Sequence, int, str | None]
# on_step(outputs) is called from the engine thread once per step with every token read back in that step.
StepCallback = Callable[[list[Output]], None]


class LLMEngine:
    def __init__(self, model, *, num_blocks: int, block_size: int, max_batched_tokens: int, max_running: int,
                 device: str, dtype: torch.dtype, max_model_len: int | None = None, cuda_graphs: bool = True,
                 overlap: bool | None = None, on_step: StepCallback | None = None):
        """overlap: queue each step before reading back the one before it (default: on CUDA, where queueing returns
        at once; on the CPU a step is computed as it is queued, so overlap would only hold each token back a step)."""
        self.blocks = BlockManager(num_blocks, block_size, max_running)
        self.scheduler = Scheduler(self.blocks, max_batched_tokens, max_running)
        self.runner = ModelRunner(model, self.blocks, num_blocks, max_running, max_model_len or num_blocks * block_size,
                                  device, dtype, cuda_graphs)
        self.on_step = on_step
        self.overlap = torch.device(device).type == "cuda" if overlap is None else overlap
        self._pending: Launched | None = None  # queued on the device, not read back yet
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
                while not (self._inbox or self._aborts or self.has_work()):
                    self._wake.wait()
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, set()
            for seq in inbox:
                self.scheduler.add(seq)
            if aborts:
                for seq in [s for s in (*self.scheduler.running, *self.scheduler.waiting) if s.id in aborts]:
                    self.scheduler.finish(seq, "abort")
            if self.has_work():
                try:
                    self.step()
                except Exception:  # the loop must outlive any failure, or every caller would hang
                    log.exception("engine step failed outside any one sequence; ending the sequences it held")
                    self._pending = None
                    failed = [*self.scheduler.running, *self.scheduler.waiting]
                    for seq in failed:
                        self.scheduler.finish(seq, "error")
                    self.on_step([(seq, -1, "error") for seq in failed])

    def warm_up(self, vocab_size: int) -> None:
        """Before serving (the loop not started): the kinds of steps serving meets, so that no request pays a kernel's
        first-use compile (Triton compiles a kernel per batch-size class, one sequence or several, and per split
        count; torch.compile per token-count class): a long prompt alone (up to 512 tokens: steps that large take
        other kernels, e.g. AWQ dequantizes its weights above 256 tokens), then prompts of several lengths arriving
        while others decode, with sampling, penalties and log-probabilities. Leaves no sequence, cached block or
        count."""
        size = self.blocks.block_size
        prompt = lambda i, n: [(7 * i + j) % (vocab_size - 1) + 1 for j in range(n)]  # noqa: E731
        room = (min(self.runner.max_blocks, len(self.blocks.blocks) // 2) - 1) * size
        longest = max(2 * size + 1, min(512, self.scheduler.max_batched_tokens, room))
        sampled = [SamplingParams(4), SamplingParams(4, temperature=0.8, top_p=0.9, top_k=20, seed=0),
                   SamplingParams(4, repetition_penalty=1.1, logprobs=2)]
        waves = [[Sequence("warm-up-0", prompt(0, longest), SamplingParams(4))],
                 [Sequence(f"warm-up-{i}", prompt(i, size + 3 * i), p) for i, p in enumerate(sampled, 1)],
                 [Sequence(f"warm-up-{i}", prompt(i, 5 + i), SamplingParams(2)) for i in (4, 5)]]
        for wave in waves:
            for seq in wave:
                self.scheduler.add(seq)
            self.step()  # the next wave arrives while this one decodes
        while self.has_work():
            self.step()
        self.blocks.clear_cache()
        self.computed_tokens = self.scheduler.cached_tokens = 0

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._pending is not None

    def step(self) -> list[Output]:
        """Schedule and queue a step, then read back the step queued before it (overlapped: its tokens are handled
        while this one runs on the device) or, without overlap, this one. Returns the tokens read back."""
        out: list[Output] = []
        batch = self.scheduler.schedule()
        launched = self._launch(batch, out) if batch else None
        out += self._drain()
        if launched is not None:
            if self.overlap:
                self._pending = launched
            else:
                out += self._finish(launched)
        if out and self.on_step:
            self.on_step(out)
        return out

    def _queue(self, batch: list[tuple[Sequence, int]]) -> Launched:
        step = self.runner.launch(batch, self._pending)
        self.computed_tokens += sum(n for _, n in batch)
        for seq, _ in batch:  # now, so that the next step's admissions can take them
            self.blocks.register(seq)
        return step

    def _launch(self, batch: list[tuple[Sequence, int]], out: list[Output]) -> Launched | None:
        """Queue the batch's step. If that fails, one bad sequence must not fail the others: the pending step is read
        back, then each sequence runs alone, and only those that fail alone end; their tokens go to `out`."""
        try:
            return self._queue(batch)
        except Exception:
            if len(batch) == 1:
                raise
            log.exception("engine step of %d sequences failed; retrying them one by one", len(batch))
        out += self._drain()
        for seq, n in batch:
            if seq.status is not Status.RUNNING:
                continue
            try:
                out += self._finish(self._queue([(seq, n)]))
            except Exception:
                log.exception("sequence %s fails on its own; ending it", seq.id)
                self.scheduler.finish(seq, "error")
                out.append((seq, -1, "error"))
        return None

    def _drain(self) -> list[Output]:
        """Read back the step still pending, if any."""
        pending, self._pending = self._pending, None
        return self._finish(pending) if pending is not None else []

    def _finish(self, step: Launched) -> list[Output]:
        """A launched step's tokens into its sequences: appended, stop conditions checked. A sequence that ended
        while the step ran (a stop token in the step before, an abort) drops its token."""
        out = []
        tokens = dict(zip(step.sampled, self.runner.finish(step)))
        for seq, _ in step.batch:
            token, logprobs = tokens.get(seq, (None, None))
            if seq.status is Status.FINISHED or token is None:  # None: a prompt chunk that is not the last
                continue
            # -1: a sequence whose logits are not finite; its KV blocks are suspect too, so nobody may take them.
            if token == -1:
                self.blocks.forget(seq)
                self.scheduler.finish(seq, "error")
                out.append((seq, -1, "error"))
                continue
            seq.num_pending -= 1
            seq.token_ids.append(token)
            if seq.status is Status.RUNNING:  # its last full block may have waited for this token
                self.blocks.register(seq)
            if logprobs is not None:
                seq.logprobs.append(logprobs)
            reason = None
            if token in seq.params.stop_token_ids:
                reason = "stop"
            elif seq.num_output >= seq.params.max_tokens:
                reason = "length"
            if reason:
                self.scheduler.finish(seq, reason)
            out.append((seq, token, reason))
        return out
