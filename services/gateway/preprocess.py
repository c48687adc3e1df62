"""Decoding and tiling in worker processes: PIL and decord hold the GIL in parts of decoding and resizing, so threads
of the gateway process would neither use the pod's cores nor leave the event loop alone.

Tiles come back through shared memory: the worker writes them once, the gateway copies them out once. The gateway
keeps a few blocks (slots) for that, each mapped once in it and in every worker that writes to it: a new block per
image had its pages allocated, zeroed and mapped again each time (13 tiles, 7.8 MB: ~6 ms of the worker's CPU and
~3 ms of the gateway's on a 2-CPU VM; `python -m bench.preprocess` measures the ways side by side). Tiles larger
than a slot, or with every slot in use, take a block of their own.
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
from services.gateway.tiling import TILE_SIZE, tile_image

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


SLOT_BYTES = 13 * TILE_SIZE * TILE_SIZE * 3  # an image's tiles at the default max_num: 12 and the thumbnail
_attached: dict[str, shared_memory.SharedMemory] = {}  # in a worker: the gateway's slots it has written to


def _to_shared_memory(fn: Callable[..., np.ndarray], slot: str | None, *args,
                      **kwargs) -> tuple[str | None, tuple[int, ...]] | np.ndarray:
    """In a worker: `fn`'s array, written to the gateway's `slot` if it fits ((None, shape)), else to a new shared
    memory block that the gateway unlinks ((its name, shape)), or the array itself (pickled through the pool's pipe)
    when /dev/shm has no room for it."""
    array = fn(*args, **kwargs)
    if slot is not None:
        if slot not in _attached:
            _attached[slot] = shared_memory.SharedMemory(name=slot)
        if array.nbytes <= _attached[slot].size:
            np.ndarray(array.shape, array.dtype, _attached[slot].buf)[...] = array
            return None, array.shape
    block = shared_memory.SharedMemory(create=True, size=max(1, array.nbytes))
    try:
        _claim_pages(block)
        np.ndarray(array.shape, array.dtype, block.buf)[...] = array
    except BaseException as e:
        block.unlink()
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return array
        raise
    finally:
        block.close()
    return block.name, array.shape


def _claim_pages(block: shared_memory.SharedMemory) -> None:
    """A block's pages claimed up front: a full /dev/shm (a container's is 64 MB unless the pod mounts a larger one)
    is then ENOSPC here, not a SIGBUS that kills the process halfway through writing."""
    os.posix_fallocate(block._fd, 0, block.size)


def _drop(block: shared_memory.SharedMemory) -> None:
    block.close()
    block.unlink()


@functools.cache
def _warn_shm_full() -> None:
    log.warning("/dev/shm is full: tiles come back from the preprocessing workers through a pipe (slower); give the "
                "gateway a larger /dev/shm (the chart's gateway.shmSizeLimit)")


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

    def __init__(self, workers: int | None = None, slot_bytes: int = SLOT_BYTES):
        self.workers = workers or available_cpus()
        self._pool: ProcessPoolExecutor | None = None
        self.in_flight = 0  # `tiles` calls
        self.slot_bytes = slot_bytes  # 0: no slots, a block per call
        self._slots: dict[str, shared_memory.SharedMemory] = {}
        self._free_slots: list[str] = []

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
        slot = self._slot()
        future = asyncio.wrap_future(pool.submit(_to_shared_memory, fn, slot, *args, **kwargs))
        self.in_flight += 1
        future.add_done_callback(self._done)
        try:
            result = await self._result(pool, asyncio.shield(future))
        except asyncio.CancelledError:  # the request went away: its slot or block is freed once the worker is done
            future.add_done_callback(functools.partial(self._discard, slot))
            raise
        except BaseException:
            self._give_back(slot)
            raise
        return self._take(slot, result)

    def _slot(self) -> str | None:
        """A free slot's name; a new slot while there are fewer than two per worker; else None."""
        if self._free_slots:
            return self._free_slots.pop()
        if not self.slot_bytes or len(self._slots) >= 2 * self.workers:
            return None
        block = shared_memory.SharedMemory(create=True, size=self.slot_bytes)
        try:
            _claim_pages(block)
        except OSError:  # no room in /dev/shm to keep one
            _drop(block)
            return None
        self._slots[block.name] = block
        return block.name

    def _take(self, slot: str | None, result: tuple[str | None, tuple[int, ...]] | np.ndarray) -> np.ndarray:
        """The tiles `_to_shared_memory` handed back; its slot given back, or its block freed."""
        try:
            if isinstance(result, np.ndarray):
                _warn_shm_full()
                return result
            name, shape = result
            if name is None:
                if slot not in self._slots:  # retired since: a worker died meanwhile
                    raise _worker_died()
                return np.ndarray(shape, np.uint8, self._slots[slot].buf).copy()
            block = shared_memory.SharedMemory(name=name)
            try:
                return np.ndarray(shape, np.uint8, block.buf).copy()
            finally:
                _drop(block)
        finally:
            self._give_back(slot)

    def _discard(self, slot: str | None, future: asyncio.Future) -> None:
        """A call whose caller went away, once the worker is done with it: its block freed (nothing copied out), its
        slot given back."""
        if not future.cancelled() and future.exception() is None:
            result = future.result()
            if isinstance(result, tuple) and result[0] is not None:
                _drop(shared_memory.SharedMemory(name=result[0]))
        self._give_back(slot)

    def _give_back(self, slot: str | None) -> None:
        if slot in self._slots:
            self._free_slots.append(slot)

    def _retire_slots(self) -> None:
        """Slots are not used again once a worker died: one being stopped might still write to any of them."""
        for block in self._slots.values():
            _drop(block)
        self._slots.clear()
        self._free_slots.clear()

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
                self._retire_slots()
            raise _worker_died() from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._retire_slots()


def _worker_died() -> ApiError:
    return ApiError(503, "the image could not be processed (a preprocessing worker died); retry",
                    type="service_unavailable")
