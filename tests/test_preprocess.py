"""The gateway's preprocessing pool: tiles made in worker processes equal the cards', worker errors reach the client
as the same 400s, and a worker that dies fails only the requests it held."""
import asyncio
import io
import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.gateway.errors import ApiError
from services.gateway.media import decode_image
from services.gateway.preprocess import Preprocessor, available_cpus, image_tiles
from tests.reference_preprocess import reference_tiles
from tests.test_tiling import noise_image


@pytest.fixture(scope="module")
def pool():
    pool = Preprocessor(2)
    yield pool
    pool.close()


def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


@pytest.mark.parametrize("fmt,size,max_num", [("JPEG", (1920, 1080), 12), ("PNG", (800, 600), 12),
                                              ("PNG", (37, 501), 6), ("JPEG", (448, 448), 1)])
@pytest.mark.parametrize("threads", [1, 4])
async def test_pool_tiles_equal_the_cards(pool, fmt, size, max_num, threads):
    data = encoded(noise_image(*size), fmt)
    tiles = await pool.tiles(image_tiles, data, 1 << 30, max_num, True, 448, threads)
    expected = reference_tiles(Image.open(io.BytesIO(data)), max_num=max_num)
    assert tiles.dtype == np.uint8 and tiles.flags.writeable
    assert np.array_equal(tiles, expected)


async def test_worker_errors_are_the_same_api_errors(pool):
    for data, max_pixels in ((b"\x89PNG\r\n\x1a\nnot really", 1 << 30), (encoded(noise_image(64, 48), "PNG"), 100)):
        with pytest.raises(ApiError) as local:
            decode_image(data, max_pixels)
        with pytest.raises(ApiError) as remote:
            await pool.tiles(image_tiles, data, max_pixels, 12, True, 448)
        assert remote.value.status == 400 and remote.value.body() == local.value.body()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


async def test_a_dead_worker_is_a_503_and_the_pool_recovers():
    pool = Preprocessor(1)
    try:
        await pool.tiles(_tile_after, 0)  # a slot in use once
        with pytest.raises(ApiError) as e:
            await pool.run(_die)
        assert e.value.status == 503
        assert not pool._slots  # a worker being stopped might still write to one: none is used again
        data = encoded(noise_image(800, 600), "JPEG")
        assert (await pool.tiles(image_tiles, data, 1 << 30, 12, True, 448)).shape == (13, 448, 448, 3)
    finally:
        pool.close()


async def test_concurrent_requests_get_their_own_tiles(pool):
    images = [encoded(noise_image(640 + 64 * i, 480, seed=i), "PNG") for i in range(5)]
    results = await asyncio.gather(*(pool.tiles(image_tiles, d, 1 << 30, 12, True, 448) for d in images))
    for data, tiles in zip(images, results):
        assert np.array_equal(tiles, reference_tiles(Image.open(io.BytesIO(data))))


def _tile_after(seconds: float) -> np.ndarray:
    import time
    time.sleep(seconds)
    return np.zeros((1, 2, 2, 3), np.uint8)


async def test_an_image_gets_the_threads_of_the_idle_workers():
    pool = Preprocessor(4)
    try:
        assert pool.spare_threads() == 4  # alone: every core
        held = [asyncio.ensure_future(pool.tiles(_tile_after, 1.0)) for _ in range(2)]
        await asyncio.sleep(0)
        assert pool.in_flight == 2 and pool.spare_threads() == 1  # a third shares the cores with two in flight
        held.append(asyncio.ensure_future(pool.tiles(_tile_after, 1.0)))
        await asyncio.sleep(0)
        assert pool.spare_threads() == 1
        held[0].cancel()  # a request that leaves: its worker is busy until its task ends
        await asyncio.gather(*held[1:])
        for _ in range(100):  # the cancelled one's worker ends on its own time
            if not pool.in_flight:
                break
            await asyncio.sleep(0.1)
        assert pool.in_flight == 0 and pool.spare_threads() == 4
    finally:
        pool.close()


async def test_slots_are_kept_for_the_next_images_and_never_shared():
    """Tiles come back through a few shared memory blocks the gateway keeps (two per worker at most), each used by
    one call at a time; tiles larger than a slot take a block of their own."""
    pool = Preprocessor(2)
    try:
        images = [encoded(noise_image(640 + 64 * i, 480, seed=i), "PNG") for i in range(6)]
        for _ in range(2):
            results = await asyncio.gather(*(pool.tiles(image_tiles, d, 1 << 30, 12, True, 448) for d in images))
            for data, tiles in zip(images, results):
                assert np.array_equal(tiles, reference_tiles(Image.open(io.BytesIO(data))))
        assert 1 <= len(pool._slots) <= 4 and sorted(pool._free_slots) == sorted(pool._slots)
        big = encoded(noise_image(800, 600), "JPEG")  # 13 tiles: more than a 12-tile slot
        small = Preprocessor(1, slot_bytes=12 * 448 * 448 * 3)
        try:
            assert np.array_equal(await small.tiles(image_tiles, big, 1 << 30, 12, True, 448),
                                  reference_tiles(Image.open(io.BytesIO(big))))
            assert len(small._free_slots) == len(small._slots) == 1
        finally:
            small.close()
    finally:
        pool.close()
    assert not pool._slots


async def test_a_cancelled_call_gives_its_slot_back_when_its_worker_is_done():
    pool = Preprocessor(1)
    try:
        call = asyncio.ensure_future(pool.tiles(_tile_after, 0.5))
        await asyncio.sleep(0.2)
        call.cancel()
        assert not pool._free_slots  # the worker may still write to it
        for _ in range(50):
            if pool._free_slots:
                break
            await asyncio.sleep(0.1)
        assert len(pool._free_slots) == len(pool._slots) == 1
    finally:
        pool.close()


def _tiles_with_shm_full(data: bytes) -> np.ndarray:
    """In a worker: as if /dev/shm had no room (for this worker's life: its pool is the test's own)."""
    def full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    os.posix_fallocate = full
    return image_tiles(data, 1 << 30, 12, True, 448)


async def test_tiles_come_through_the_pipe_when_shared_memory_is_full(caplog):
    pool = Preprocessor(1, slot_bytes=0)  # no slot: a block of its own, which has no room
    try:
        data = encoded(noise_image(800, 600), "JPEG")
        with caplog.at_level("WARNING", "services.gateway.preprocess"):
            tiles = await pool.tiles(_tiles_with_shm_full, data)
        assert np.array_equal(tiles, reference_tiles(Image.open(io.BytesIO(data))))
        assert "/dev/shm is full" in caplog.text
    finally:
        pool.close()


SMALL_SHM = """
import asyncio, io, sys
import numpy as np
from PIL import Image
from services.gateway.preprocess import Preprocessor, image_tiles
from tests.reference_preprocess import reference_tiles

async def main():
    pool = Preprocessor(1)
    data = open(sys.argv[1], "rb").read()
    tiles = await pool.tiles(image_tiles, data, 1 << 30, 12, True, 448)  # 13 tiles, 7.8 MB: more than /dev/shm
    assert np.array_equal(tiles, reference_tiles(Image.open(io.BytesIO(data))))
    pool.close()
    print("ok")

asyncio.run(main())
"""


def test_a_small_dev_shm_does_not_kill_the_workers(tmp_path):
    """A real 4 MB /dev/shm (a mount namespace of its own): before, the worker writing 7.8 MB of tiles into it died
    of SIGBUS and the request failed; now they come through the pipe."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("mount namespaces are not permitted here (unshare -m)")
    (tmp_path / "image.jpg").write_bytes(encoded(noise_image(800, 600), "JPEG"))
    out = subprocess.run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=4m tmpfs /dev/shm && exec "$@"', "-",
                          sys.executable, "-c", SMALL_SHM, str(tmp_path / "image.jpg")],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    assert "/dev/shm is full" in out.stderr


def _page_faults_per_image(data: bytes) -> list[int]:
    """In a worker: the minor page faults of each of 4 decodes + tilings of the same image."""
    counts = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        image_tiles(data, 1 << 30, 12, True, 448)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts


async def test_workers_reuse_an_images_memory_for_the_next(pool):
    """With glibc's defaults each 1920x1080 JPEG faulted ~4,900 fresh pages in (~19 MB: its arrays were given back
    to the kernel when freed); a worker keeps them for the next image (reuse_freed_memory)."""
    counts = await pool.run(_page_faults_per_image, encoded(noise_image(1920, 1080), "JPEG"))
    assert max(counts[1:]) < 200, counts


def test_available_cpus_is_the_affinity_or_less():
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_a_gateways_workers_exit_with_it(stack, tiny_checkpoint, tmp_path, stop):
    """Stopped, or killed (an OOM kill) so that it cannot shut its pool down, a gateway leaves no worker behind:
    they would otherwise wait forever on a task queue that their siblings hold open."""
    import subprocess
    import time

    from tests.conftest import start_gateway

    proc, _ = start_gateway(stack, tiny_checkpoint, tmp_path / "gateway.log", PREPROCESS_WORKERS="2")
    workers = [int(p) for p in subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "spawn_main"],
                                              capture_output=True, text=True).stdout.split()]
    assert len(workers) == 2
    proc.send_signal(getattr(signal, stop))
    proc.wait(30)
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{w}") for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if os.path.exists(f"/proc/{w}")]
