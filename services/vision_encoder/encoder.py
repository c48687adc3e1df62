"""Loads the vision tower and encodes tiles, batching tiles of concurrent requests into shared forward passes."""
import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from prometheus_client import Counter, Gauge

from services.common.checkpoint import ModelConfig
from services.common.weights import TensorReader, load_weights, same_name
from services.vision_encoder.intern_vit import (InternVisionModel, native_vision_name, original_projector_name,
                                                original_vision_name)

log = logging.getLogger(__name__)

TILES = Counter("vision_tiles_encoded_total", "Tiles run through the vision tower")
BATCHES = Counter("vision_batches_total", "Forward passes of the vision tower")
QUEUED_TILES = Gauge("vision_queued_tiles", "Tiles waiting for a forward pass (the pool's autoscaling signal)")
WAITING = Gauge("vision_requests_waiting", "Encode calls none of whose images has reached a forward pass yet")
BUSY = Counter("vision_busy_seconds_total", "Time the vision tower spent in forward passes")
UTILIZATION = Gauge("vision_utilization", "Share of the last 30 s the vision tower spent in forward passes")
UTILIZATION_WINDOW_S = 30.0
GPU_MEMORY = Gauge("vision_gpu_memory_bytes", "GPU memory held by torch's allocator (reserved; 0 on CPU)")


def load_vision_model(cfg: ModelConfig, path: Path, device: str, dtype: torch.dtype) -> InternVisionModel:
    """Build the tower + projector and fill them from the checkpoint's vision and projector tensors only."""
    start = time.perf_counter()
    with torch.device("meta"):
        model = InternVisionModel(cfg)
    model = model.to(dtype).to_empty(device=device)  # no random init of weights about to be overwritten
    reader = TensorReader(path)
    native = cfg.layout == "native"
    load_weights(model.vision_tower, reader, cfg.vision_prefix, native_vision_name if native else original_vision_name)
    load_weights(model.projector, reader, cfg.projector_prefix, same_name if native else original_projector_name)
    log.info("vision model loaded in %.1fs (%s, %s)", time.perf_counter() - start, device, dtype)
    if device.startswith("cuda"):  # read at scrape time, so it includes the activations of the largest batch
        GPU_MEMORY.set_function(lambda: torch.cuda.memory_reserved(device))
    return model.eval()


class _Call:
    """One Encode call's images: counted as waiting until the first of them reaches a forward pass."""

    def __init__(self):
        self.waiting = True
        WAITING.inc()

    def started(self) -> None:
        if self.waiting:
            self.waiting = False
            WAITING.dec()


@dataclass
class _Job:
    tiles: torch.Tensor           # uint8 [n, H, W, 3]
    future: asyncio.Future
    call: _Call


class Utilization:
    """Share of the last UTILIZATION_WINDOW_S seconds the tower spent in forward passes (the busy one included)."""

    def __init__(self):
        self.spans: deque[tuple[float, float]] = deque()  # (start, end) of recent forward passes
        self.busy_since: float | None = None

    def begin(self) -> None:
        self.busy_since = time.monotonic()

    def end(self) -> None:
        start, self.busy_since = self.busy_since, None
        self.spans.append((start, time.monotonic()))
        BUSY.inc(self.spans[-1][1] - start)

    def value(self) -> float:
        now = time.monotonic()
        since = now - UTILIZATION_WINDOW_S
        while self.spans and self.spans[0][1] < since:
            self.spans.popleft()
        spans = [*self.spans, *([(self.busy_since, now)] if self.busy_since is not None else [])]
        return sum(end - max(start, since) for start, end in spans) / UTILIZATION_WINDOW_S


class TileBatcher:
    """Queue in front of the model: one worker forms batches of up to `max_batch_tiles` from concurrent calls."""

    def __init__(self, model: InternVisionModel, device: str, max_batch_tiles: int, max_wait_s: float):
        self.model, self.device = model, device
        self.max_batch_tiles, self.max_wait_s = max_batch_tiles, max_wait_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="vision-forward")  # the device runs one batch at a time
        self.worker: asyncio.Task | None = None
        self.utilization = Utilization()
        self.queued_tiles = 0  # what QUEUED_TILES shows, for the servicer's bound
        UTILIZATION.set_function(self.utilization.value)

    def start(self) -> None:
        self.worker = asyncio.create_task(self._run())

    async def encode(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Embeddings [n_i * tokens_per_tile, hidden] for each image's uint8 tiles [n_i, H, W, 3]."""
        loop = asyncio.get_running_loop()
        call = _Call()
        jobs = [_Job(tiles, loop.create_future(), call) for tiles in images]
        for job in jobs:
            self._queued(job.tiles.shape[0])
            self.queue.put_nowait(job)
        try:
            return list(await asyncio.gather(*(job.future for job in jobs)))
        finally:
            call.started()  # a caller that left stops waiting too

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        carry: _Job | None = None
        while True:
            batch = [carry or await self.queue.get()]
            carry = None
            if batch[0].future.done():  # its caller has gone (cancelled or timed out): skip the work
                self._queued(-batch[0].tiles.shape[0])
                continue
            tiles = batch[0].tiles.shape[0]
            deadline = loop.time() + self.max_wait_s
            while tiles < self.max_batch_tiles:
                try:
                    job = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    break
                if job.future.done():
                    self._queued(-job.tiles.shape[0])
                    continue
                if tiles + job.tiles.shape[0] > self.max_batch_tiles:
                    carry = job  # starts the next batch
                    break
                batch.append(job)
                tiles += job.tiles.shape[0]
            self._queued(-tiles)
            for job in batch:
                job.call.started()
            self.utilization.begin()
            try:
                outputs = await loop.run_in_executor(self.executor, self._forward, [j.tiles for j in batch])
            except Exception as e:  # a failed batch fails its callers, not the worker
                log.exception("vision forward failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            finally:
                self.utilization.end()
            for job, out in zip(batch, outputs):
                if not job.future.done():
                    job.future.set_result(out)

    def _queued(self, tiles: int) -> None:
        self.queued_tiles += tiles
        QUEUED_TILES.inc(tiles)

    def _forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        tiles = torch.cat(images).to(self.device, non_blocking=True)
        # A single image larger than a batch still runs, in slices of max_batch_tiles.
        out = torch.cat([self.model(chunk) for chunk in tiles.split(self.max_batch_tiles)])
        BATCHES.inc()
        TILES.inc(tiles.shape[0])
        per_tile = out.shape[0] // tiles.shape[0]
        # One device->host copy for the batch (one synchronisation), split on the host into each image's rows.
        return list(out.cpu().split([img.shape[0] * per_tile for img in images]))
