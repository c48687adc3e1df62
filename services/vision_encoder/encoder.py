"""Loads the vision tower and encodes tiles, batching tiles of concurrent requests into shared forward passes."""
import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from prometheus_client import Counter, Gauge

from services.common.checkpoint import ModelConfig
from services.common.cuda_graphs import bucket_sizes, record
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
    model.init_pixel_stats()
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
    """Share of the last UTILIZATION_WINDOW_S seconds the tower had a batch in flight (the current one included);
    batches in flight together count once."""

    def __init__(self):
        self.spans: deque[tuple[float, float]] = deque()  # (start, end) of recent busy periods
        self.busy_since: float | None = None
        self.in_flight = 0

    def begin(self) -> None:
        if not self.in_flight:
            self.busy_since = time.monotonic()
        self.in_flight += 1

    def end(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
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


class VisionRunner:
    """Runs one batch of uint8 tiles through the model; each image's embeddings come back on the host.

    On CUDA, `launch` returns once the work is queued: the tiles are staged in pinned memory and copied on a stream
    of their own (so the next batch's copy overlaps this batch's forward pass), and the outputs come back through one
    asynchronous copy into pinned memory, which the function `launch` returns waits for. Batches of up to
    `graph_tiles` tiles replay CUDA graphs captured at start-up (small batches are paced by kernel launches, not by
    the GPU); `compile` names a torch.compile backend ("inductor") to run the model through.
    """

    def __init__(self, model, device: str, max_batch_tiles: int, graph_tiles: int = 0, compile: str = ""):
        self.device, self.max_batch_tiles = torch.device(device), max_batch_tiles
        # fullgraph: a graph break fails here rather than running slowly.
        self.forward = torch.compile(model, backend=compile, fullgraph=True) if compile else model
        self.compiled = bool(compile)
        self.graph_tiles = min(graph_tiles, max_batch_tiles)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if self.device.type == "cuda":
            self.copy_stream = torch.cuda.Stream(self.device)
            if self.graph_tiles:
                self._capture(model.cfg.vision.image_size)
            self.warm_up(model.cfg.vision.image_size)
        elif self.graph_tiles:
            raise ValueError("CUDA graphs need a CUDA device")

    def warm_up(self, image_size: int) -> None:
        """One tile, then two, before serving: torch.compile makes its graphs (one for a single tile, one for every
        larger batch; tens of seconds each on the GPU) here rather than in the first requests, and the GPU loads its
        kernels. Sizes the CUDA graphs hold ran when they were captured. Not counted in the metrics."""
        for n in (1, 2):
            if n > self.graph_tiles:
                self._forward(torch.zeros((n, image_size, image_size, 3), dtype=torch.uint8, device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def launch(self, images: list[torch.Tensor]) -> Callable[[], list[torch.Tensor]]:
        """Start the forward pass of `images` (uint8 [n_i, H, W, 3] each); the function returned waits for it and
        returns each image's rows [n_i * tokens_per_tile, hidden]."""
        sizes = [img.shape[0] for img in images]
        done = None
        if self.device.type != "cuda":
            out = self.run(torch.cat(images))
        else:
            host = torch.empty((sum(sizes), *images[0].shape[1:]), dtype=torch.uint8, pin_memory=True)
            torch.cat(images, out=host)
            with torch.cuda.stream(self.copy_stream):
                tiles = host.to(self.device, non_blocking=True)  # the host allocator keeps `host` until this is done
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.copy_stream)
            tiles.record_stream(compute)  # allocated on the copy stream, used and freed on this one
            rows = self.run(tiles)
            out = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            out.copy_(rows, non_blocking=True)
            done = torch.cuda.Event()
            done.record(compute)
        per_tile = out.shape[0] // sum(sizes)

        def result() -> list[torch.Tensor]:
            if done is not None:
                done.synchronize()
            return list(out.split([n * per_tile for n in sizes]))
        return result

    def run(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 tiles on the device -> their embeddings on the device."""
        BATCHES.inc()
        TILES.inc(tiles.shape[0])
        if tiles.shape[0] <= self.graph_tiles:
            return self._replay(tiles)
        if tiles.shape[0] <= self.max_batch_tiles:
            return self._forward(tiles)
        # A single image larger than a batch still runs, in slices of max_batch_tiles.
        return torch.cat([self._forward(chunk) for chunk in tiles.split(self.max_batch_tiles)])

    def _forward(self, tiles: torch.Tensor) -> torch.Tensor:
        if self.compiled and tiles.shape[0] > 1:
            # One graph for every batch of 2 tiles or more from the first call on (one tile has its own).
            torch._dynamo.mark_dynamic(tiles, 0)
        return self.forward(tiles)

    def _capture(self, image_size: int) -> None:
        """Capture the forward pass at bucket sizes up to `graph_tiles`; a batch runs in the smallest bucket that
        holds it, its tiles copied into the bucket's input (tiles never attend to each other: the spare rows'
        stale tiles cannot change the real rows' embeddings)."""
        self.graph_sizes = bucket_sizes(self.graph_tiles)
        self.static_tiles = torch.zeros((self.graph_tiles, image_size, image_size, 3), dtype=torch.uint8,
                                        device=self.device)
        pool = None
        for size in reversed(self.graph_sizes):
            graph, out = record(lambda size=size: self._forward(self.static_tiles[:size]), pool)
            pool = graph.pool()
            self.graphs[size] = (graph, out)

    def _replay(self, tiles: torch.Tensor) -> torch.Tensor:
        n = tiles.shape[0]
        size = next(s for s in self.graph_sizes if s >= n)
        graph, out = self.graphs[size]
        self.static_tiles[:n].copy_(tiles)
        graph.replay()
        # A view of the graph's output: read (copied to the host) before the next replay, in stream order.
        return out[:n * (out.shape[0] // size)]


class TileBatcher:
    """Queue in front of the model: one worker forms batches of up to the runner's `max_batch_tiles` from concurrent
    calls and keeps `in_flight` of them launched at once (the next one is formed and queued while the GPU runs this
    one)."""

    def __init__(self, runner: VisionRunner, max_wait_s: float, in_flight: int = 2):
        self.runner, self.max_wait_s, self.in_flight = runner, max_wait_s, in_flight
        self.max_batch_tiles = runner.max_batch_tiles
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        # One thread launches (the device takes batches in order), another waits for the results.
        self.launcher = ThreadPoolExecutor(1, thread_name_prefix="vision-launch")
        self.finisher = ThreadPoolExecutor(1, thread_name_prefix="vision-finish")
        self.worker: asyncio.Task | None = None
        self.finishing: set[asyncio.Task] = set()
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
        slots = asyncio.Semaphore(self.in_flight)
        carry: _Job | None = None
        while True:
            await slots.acquire()  # taken before the batch is formed: it grows while earlier batches run
            batch, carry = await self._next_batch(carry)
            for job in batch:
                job.call.started()
            self.utilization.begin()
            try:
                result = await loop.run_in_executor(self.launcher, self.runner.launch, [j.tiles for j in batch])
            except Exception as e:
                self._done(batch, slots, error=e)
                continue
            task = asyncio.create_task(self._finish(batch, result, slots))
            self.finishing.add(task)
            task.add_done_callback(self.finishing.discard)

    async def _next_batch(self, carry: _Job | None) -> tuple[list[_Job], _Job | None]:
        """Jobs for one forward pass (those whose callers have gone are skipped), and the one that starts the next."""
        loop = asyncio.get_running_loop()
        while True:
            first, carry = carry or await self.queue.get(), None
            if not first.future.done():  # done: its caller has gone (cancelled or timed out)
                break
            self._queued(-first.tiles.shape[0])
        batch, tiles = [first], first.tiles.shape[0]
        # Waiting for more tiles pays only while another batch has the device (this one would wait for it anyway);
        # on an idle device it would only delay this one. What is queued already joins in either case.
        deadline = loop.time() + (self.max_wait_s if self.utilization.in_flight else 0.0)
        while tiles < self.max_batch_tiles:
            if self.queue.empty():
                try:
                    job = await asyncio.wait_for(self.queue.get(), deadline - loop.time())
                except TimeoutError:
                    break
            else:
                job = self.queue.get_nowait()
            if job.future.done():
                self._queued(-job.tiles.shape[0])
                continue
            if tiles + job.tiles.shape[0] > self.max_batch_tiles:
                carry = job  # starts the next batch
                break
            batch.append(job)
            tiles += job.tiles.shape[0]
        self._queued(-tiles)
        return batch, carry

    async def _finish(self, batch: list[_Job], result: Callable[[], list[torch.Tensor]],
                      slots: asyncio.Semaphore) -> None:
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(self.finisher, result)
        except Exception as e:
            self._done(batch, slots, error=e)
        else:
            self._done(batch, slots, outputs=outputs)

    def _done(self, batch: list[_Job], slots: asyncio.Semaphore, outputs: list[torch.Tensor] | None = None,
              error: Exception | None = None) -> None:
        """Answer a batch's callers (a failed batch fails its callers, not the worker) and free its slot."""
        self.utilization.end()
        slots.release()
        if error is not None:
            log.error("vision forward failed", exc_info=error)
        for i, job in enumerate(batch):
            if not job.future.done():
                if error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(outputs[i])

    def _queued(self, tiles: int) -> None:
        self.queued_tiles += tiles
        QUEUED_TILES.inc(tiles)
