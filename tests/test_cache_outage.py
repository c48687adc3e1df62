"""A Redis that stops answering costs one short timeout, then the cache is skipped for a while (a circuit), and
requests are served without it; the cache comes back by itself."""
import asyncio
import socket
import threading
import time

from prometheus_client import REGISTRY

from services.common.cache import EmbeddingCache


class Silent:
    """Accepts connections and never answers: a hung Redis."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port, self.held = self.sock.getsockname()[1], []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return


async def test_a_hung_redis_opens_the_circuit_then_closes_it(redis_url):
    silent = Silent()
    cache = EmbeddingCache(f"redis://127.0.0.1:{silent.port}/0", ttl_s=60, cooldown_s=0.5)
    start = time.monotonic()
    assert await cache.get_many(["a", "b"]) == [None, None]  # one timeout (1 s) ...
    first = time.monotonic() - start
    start = time.monotonic()
    for _ in range(20):  # ... then no waiting at all while the circuit is open
        assert await cache.get_many(["a"]) == [None]
        await cache.put("a", b"x")
    assert 0.5 < first < 3 and time.monotonic() - start < 0.2
    await cache.close()

    healthy = EmbeddingCache(redis_url, ttl_s=60, cooldown_s=0.3)
    await healthy.put("outage-test", b"v")
    healthy._failed("read", OSError("simulated outage"))
    assert REGISTRY.get_sample_value("embedding_cache_up") == 0
    assert await healthy.get_many(["outage-test"]) == [None]  # open: not even tried
    time.sleep(0.4)
    assert await healthy.get_many(["outage-test"]) == [b"v"]  # tried again, and it answers
    assert REGISTRY.get_sample_value("embedding_cache_up") == 1
    await healthy.close()


async def test_the_vision_pool_answers_without_waiting_for_its_cache_writes(cfg):
    """A hung Redis does not delay the Encode answer: the write runs after it."""
    import torch

    from internvl.serving.v1 import serving_pb2 as pb
    from services.common.tensors import to_proto
    from services.vision_encoder.server import VisionEncoderServicer

    class Batcher:
        queued_tiles = 0

        async def encode(self, images):
            return [torch.zeros(img.shape[0] * 256, cfg.text.hidden_size) for img in images]

    silent = Silent()
    cache = EmbeddingCache(f"redis://127.0.0.1:{silent.port}/0", ttl_s=60)
    servicer = VisionEncoderServicer(cfg, Batcher(), cache, pb.ModelInfo(fingerprint="f"))
    size = cfg.vision.image_size
    tiles = to_proto(torch.zeros(1, size, size, 3, dtype=torch.uint8))
    start = time.monotonic()
    response = await servicer.Encode(pb.EncodeRequest(images=[pb.ImageTiles(tiles=tiles, cache_key="k")]), None)
    assert time.monotonic() - start < 0.5 and len(response.images) == 1  # the write (1 s timeout) still runs
    assert len(servicer._writes) == 1
    await asyncio.gather(*servicer._writes)
    await cache.close()


async def test_a_restarted_redis_is_used_again_at_once():
    """After Redis restarts, each pooled connection fails once ("closed by server"): one retry on a new connection,
    not a circuit opened in every process that had talked to the old server."""
    import redis as sync_redis

    from tools.run_local import start_redis

    def wait_until_up(url: str) -> None:
        for _ in range(100):
            try:
                if sync_redis.Redis.from_url(url).ping():
                    return
            except sync_redis.ConnectionError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    proc, url = start_redis()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    cache = EmbeddingCache(url, ttl_s=60)
    try:
        wait_until_up(url)
        assert await cache.put("restart-test", b"v") and await cache.get_many(["restart-test"]) == [b"v"]
        proc.kill()
        proc.wait()
        proc, _ = start_redis(port=port)
        wait_until_up(url)
        assert await cache.get_many(["restart-test"]) == [None]  # a new, empty Redis, read at the first try
        assert cache.usable()
    finally:
        await cache.close()
        proc.kill()
        proc.wait()
