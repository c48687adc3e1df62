"""The gateway's memory under a burst of large images: decoded pixels in flight are bounded by MAX_DECODE_PIXELS, so
its RSS stays under idle + BYTES_PER_PIXEL * MAX_DECODE_PIXELS + the bodies in flight (README, "Backpressure")."""
import asyncio
import base64
import io
import threading
import uuid

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from tools.run_local import start_stack

MPX = 1024 * 1024
MAX_DECODE_PIXELS = 48 * MPX  # two of the 24 Mpx images at a time
# Decoding holds the decoded image (Pillow stores RGB in 4 bytes a pixel) and its RGB conversion (another 4); tiling
# a resized copy of at most the tiles' pixels.
BYTES_PER_PIXEL = 8


@pytest.fixture(scope="module")
def budgeted(tiny_checkpoint, redis_url, tmp_path_factory):
    with open(tmp_path_factory.mktemp("memory") / "stack.log", "w") as log:
        stack = start_stack(str(tiny_checkpoint), redis_url=redis_url, log=log, extra_env={
            "CACHE_NAMESPACE": f"memory-{uuid.uuid4().hex}", "MAX_DECODE_PIXELS": str(MAX_DECODE_PIXELS)})
        yield stack
        stack.stop()


def large_jpegs(n: int, width: int = 6000, height: int = 4000) -> list[bytes]:
    """n different 24 Mpx JPEGs of a few hundred kB each (smooth gradients: the bodies stay small, the pixels do not)."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    buf = io.BytesIO()
    Image.fromarray(np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], -1).astype(np.uint8)).save(buf, "JPEG", quality=80)
    data = buf.getvalue()
    # A comment segment right after the start marker makes each one's bytes (its cache key) differ, pixels alike.
    return [data[:2] + b"\xff\xfe" + (2 + 8).to_bytes(2, "big") + f"{i:08d}".encode() + data[2:] for i in range(n)]


async def test_gateway_rss_stays_bounded_while_16_large_images_arrive_at_once(budgeted):
    images = large_jpegs(16)
    bodies = [{"model": "tiny-internvl2_5", "max_tokens": 1, "max_num": 1, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(img).decode()}},
        {"type": "text", "text": "What?"}]}]} for img in images]
    gateway = psutil.Process(budgeted.procs["gateway"].pid)
    async with httpx.AsyncClient(base_url=budgeted.gateway_url, timeout=120) as client:
        r = await client.post("/v1/chat/completions", json={"model": "tiny-internvl2_5", "max_tokens": 1,
                                                            "messages": [{"role": "user", "content": "warm up"}]})
        assert r.status_code == 200
        idle = gateway.memory_info().rss
        peak, done = idle, threading.Event()

        def sample():
            nonlocal peak
            while not done.wait(0.01):
                peak = max(peak, gateway.memory_info().rss)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            responses = await asyncio.wait_for(asyncio.gather(
                *(client.post("/v1/chat/completions", json=b) for b in bodies)), 120)
        finally:
            done.set()
            sampler.join()
    assert [r.status_code for r in responses] == [200] * 16, [r.text for r in responses if r.status_code != 200]
    in_flight_bodies = 3 * sum(len(b["messages"][0]["content"][0]["image_url"]["url"]) for b in bodies)  # text, JSON, bytes
    bound = idle + BYTES_PER_PIXEL * MAX_DECODE_PIXELS + in_flight_bodies + 64 * MPX  # 64 MiB: allocator slack
    unbudgeted = BYTES_PER_PIXEL * 16 * 6000 * 4000  # what decoding all 16 at once would take
    assert peak - idle > 0.1 * BYTES_PER_PIXEL * MAX_DECODE_PIXELS, "no large image was decoded"
    assert peak < bound < idle + unbudgeted, (f"peak {(peak - idle) / MPX:.0f} MiB over idle; bound "
                                              f"{(bound - idle) / MPX:.0f} MiB")
