"""Decoding and tiling in worker processes: PIL and decord hold the GIL in parts of decoding and resizing, so threads
of the gateway process would neither use the pod's cores nor leave the event loop alone.

Tiles come back through shared memory: the worker writes them once, the gateway copies them out once. Measured by
`python -m bench.preprocess` for 13 tiles (7.8 MB): ~5 ms of worker CPU against ~8 ms for a pickled array through the
pool's pipe, and about the same in the gateway (~3 ms either way).
"""
import asyncio
import errno
import functools
import logging
import math
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory
from typing import Callable

import numpy as np

from services.gateway.errors import ApiError
from services.gateway.malloc import reuse_freed_memory
from services.gateway.media import decode_image
from services.gateway.tiling import tile_image

log = logging.getLogger(__name__)


def available_cpus() -> int:
    """CPUs this process may use: its affinity, bounded by a cgroup v2 CPU quota (a pod's CPU limit), rounded up."""
    cpus = len(os.sched_getaffinity(0))
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            cpus = min(cpus, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def image_tiles(data: bytes, max_pixels: int, max_num: int, use_thumbnail: bool, tile_size: int,
                threads: int = 1) -> np.ndarray:
    """uint8 [n, tile_size, tile_size, 3]: the encoded image decoded once and tiled as the cards do (its resizes
    spread over `threads`)."""
    return tile_image(decode_image(data, max_pixels), max_num=max_num, use_thumbnail=use_thumbnail,
                      tile_size=tile_size, threads=threads)


def _to_shared_memory(fn: Callable[..., np.ndarray], *args, **kwargs) -> tuple[str, tuple[int, ...]] | np.ndarray:
    """In a worker: `fn`'s array, written to a new shared memory block that the gateway unlinks (`_take`), or the
    array itself (pickled through the pool's pipe) when /dev/shm has no room for it."""
    array = fn(*args, **kwargs)
    block = shared_memory.SharedMemory(create=True, size=max(1, array.nbytes))
    try:
        # The block's pages claimed first: a full /dev/shm (a container's is 64 MB unless the pod mounts a larger
        # one) is then ENOSPC here, not a SIGBUS that kills the worker halfway through writing.
        os.posix_fallocate(block._fd, 0, block.size)
        np.ndarray(array.shape, array.dtype, block.buf)[...] = array
    except BaseException as e:
        block.unlink()
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return array
        raise
    finally:
        block.close()
    return block.name, array.shape


def _take(result: tuple[str, tuple[int, ...]] | np.ndarray) -> np.ndarray:
    """The array `_to_shared_memory` handed back, its shared memory block freed."""
    if isinstance(result, np.ndarray):
        _warn_shm_full()
        return result
    name, shape = result
    block = shared_memory.SharedMemory(name=name)
    try:
        return np.ndarray(shape, np.uint8, block.buf).copy()
    finally:
        block.close()
        block.unlink()


@functools.cache
def _warn_shm_full() -> None:
    log.warning("/dev/shm is full: tiles come back from the preprocessing workers through a pipe (slower); give the "
                "gateway a larger /dev/shm (the chart's gateway.shmSizeLimit)")


def _free(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is None:
        _take(future.result())


def _ready() -> None:
    """A worker's first task: its imports are done."""


def _init_worker(parent: int) -> None:
    _exit_with(parent)
    reuse_freed_memory()


def _exit_with(parent: int) -> None:
    """Exit when the gateway is gone. Killed (SIGKILL, an OOM kill) the gateway cannot shut its pool down, and the
    workers' shared task queue never reports end-of-file while a sibling holds it open: they would wait forever."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class Preprocessor:
    """A pool of `workers` processes, started on first use (or by `start`). A worker that dies (killed for memory)
    fails the requests in flight with a 503 and the pool is started afresh for the next ones."""

    def __init__(self, workers: int | None = None):
        self.workers = workers or available_cpus()
        self._pool: ProcessPoolExecutor | None = None
        self.in_flight = 0  # `tiles` calls

    def spare_threads(self) -> int:
        """Threads for the next image's resizes (or video's frames): the cores of the workers that are idle, shared
        with the calls in flight. One image alone gets every core (its time to first token); a busy pool, one each
        (no thread overhead where every core already has an image)."""
        return max(1, self.workers // (self.in_flight + 1))

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the gateway process runs gRPC threads and an event loop, which a fork would copy
            # in an undefined state.
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(os.getpid(),))
        return self._pool

    async def start(self) -> None:
        """Start every worker now (a worker's imports take ~0.5 s: not on the first requests)."""
        await asyncio.gather(*(self.run(_ready) for _ in range(self.workers)))

    async def run(self, fn: Callable, *args, **kwargs):
        """`fn(*args, **kwargs)` in a worker; its result is pickled back (small results)."""
        pool = self._executor()
        return await self._result(pool, asyncio.wrap_future(pool.submit(fn, *args, **kwargs)))

    async def tiles(self, fn: Callable[..., np.ndarray], *args, **kwargs) -> np.ndarray:
        """`fn`'s uint8 tiles, made in a worker and moved through shared memory."""
        pool = self._executor()
        future = asyncio.wrap_future(pool.submit(_to_shared_memory, fn, *args, **kwargs))
        self.in_flight += 1
        future.add_done_callback(self._done)
        try:
            return _take(await self._result(pool, asyncio.shield(future)))
        except asyncio.CancelledError:  # the request went away: its block is freed once the worker is done
            future.add_done_callback(_free)
            raise

    def _done(self, future: asyncio.Future) -> None:
        self.in_flight -= 1

    async def _result(self, pool: ProcessPoolExecutor, future: asyncio.Future):
        try:
            return await future
        except BrokenProcessPool:
            if self._pool is pool:
                log.error("a preprocessing worker died; starting the pool afresh")
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
            raise ApiError(503, "the image could not be processed (a preprocessing worker died); retry",
                           type="service_unavailable") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
