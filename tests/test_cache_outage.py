"""A Redis that stops answering costs one short timeout, then the cache is skipped for a while (a circuit), and
requests are served without it; the cache comes back by itself."""
import asyncio
import socket
import threading
import time
from unittest import mock

from prometheus_client import REGISTRY

from services.common.cache import EmbeddingCache, _ValueConnection


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
    not a circuit opened in every process that had talked to the old server. Values move on connections of their
    own: the same, however many are idle."""
    from tools.run_local import start_redis

    proc, url = start_redis()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    cache = EmbeddingCache(url, ttl_s=60)
    try:
        assert await cache.put("restart-test", b"v")
        assert await asyncio.gather(*(cache.get_many(["restart-test"]) for _ in range(3))) == [[b"v"]] * 3
        assert len(cache._idle) >= 1
        proc.kill()
        proc.wait()
        proc, _ = start_redis(port=port)
        assert await cache.get_many(["restart-test"]) == [None]  # a new, empty Redis, read at the first try
        assert await cache.put("restart-test", b"w") and await cache.get_many(["restart-test"]) == [b"w"]
        assert cache.usable() and len(cache._idle) == 1
    finally:
        await cache.close()
        proc.kill()
        proc.wait()


class Throttle:
    """A TCP proxy to Redis that moves Redis's answers (or the commands to it: `commands`) at `rate` bytes/s over all
    its connections together (a busy link or a loaded process), and stops them for good past `budget` bytes (a Redis
    that stalls mid-value)."""

    def __init__(self, redis_url: str, rate: float, budget: float = float("inf"), commands: bool = False):
        host, port = redis_url.split("//")[1].split("/")[0].rsplit(":", 1)
        self.upstream, self.rate, self.budget, self.commands = (host, int(port)), rate, budget, commands
        self.moved, self.free_at, self.lock = 0, 0.0, threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            client = self.sock.accept()[0]
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, server, self.commands), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, not self.commands), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, throttled: bool):
        while data := src.recv(1 << 16):
            if throttled:
                with self.lock:
                    if self.moved + len(data) > self.budget:
                        return  # both sockets stay open: the reader waits for bytes that never come
                    self.moved += len(data)
                    now = time.monotonic()
                    self.free_at = max(self.free_at, now) + len(data) / self.rate
                    wait = self.free_at - now
                time.sleep(wait)
            dst.sendall(data)


def big_value() -> bytes:
    """An 8B model's 13-tile image: 3328 x 4096 bf16, 27 MB."""
    from services.common.cache import encode_value
    return encode_value("f", 13, "bfloat16", [3328, 4096], bytes(3328 * 4096 * 2))


async def test_large_values_read_together_do_not_open_the_circuit(redis_url):
    """8 images of 27 MB read at once over a link that moves 80 MB/s: each read takes ~2.7 s, past the 1 s a command
    may take, yet none is counted as an outage (the deadline grows with the bytes read)."""
    import redis as sync_redis

    value, keys = big_value(), [f"bulk-test-{i}" for i in range(8)]
    store = sync_redis.Redis.from_url(redis_url)
    for key in keys:
        store.set(key, value)
    cache = EmbeddingCache(Throttle(redis_url, rate=80e6).url, ttl_s=60)
    errors = REGISTRY.get_sample_value("embedding_cache_errors_total")
    try:
        start = time.monotonic()
        values = await asyncio.gather(*(cache.get_many([key, "bulk-test-absent"]) for key in keys))
        assert time.monotonic() - start > 1.5  # the link was the bottleneck: slower than one command may take
        assert values == [[value, None]] * len(keys)
        assert cache.usable() and REGISTRY.get_sample_value("embedding_cache_errors_total") == errors
    finally:
        await cache.close()
        store.delete(*keys)


async def test_large_values_written_over_a_slow_link_do_not_open_the_circuit(redis_url):
    """The vision pool's write of a 27 MB value over a link that moves 24 MB/s: ~1.1 s, past the 1 s a command may
    take (redis-py's own timeout failed such a write and opened the circuit), yet stored and not counted as an
    outage; past the growing deadline (a link that stops) it fails in bounded time, and drops what it had left to
    send."""
    import redis as sync_redis

    from services.common.cache import TIMEOUT_S, VALUE_BYTES_PER_S

    value = big_value()
    errors = REGISTRY.get_sample_value("embedding_cache_errors_total")
    cache = EmbeddingCache(Throttle(redis_url, rate=24e6, commands=True).url, ttl_s=60)
    try:
        start = time.monotonic()
        assert await cache.put("slow-write-test", value)  # within its deadline of 1 s + 27.3 MB / 25 MB/s
        assert time.monotonic() - start > 1.05
        assert cache.usable() and REGISTRY.get_sample_value("embedding_cache_errors_total") == errors
        assert sync_redis.Redis.from_url(redis_url).strlen("slow-write-test") == len(value)
    finally:
        await cache.close()
    stalled = EmbeddingCache(Throttle(redis_url, rate=1e9, budget=1e6, commands=True).url, ttl_s=60)
    opened, open_ = [], _ValueConnection.open

    async def kept(pool):
        opened.append(await open_(pool))
        return opened[-1]

    try:
        start = time.monotonic()
        with mock.patch.object(_ValueConnection, "open", kept):
            assert not await stalled.put("stalled-write-test", value)
        waited, bound = time.monotonic() - start, TIMEOUT_S + len(value) / VALUE_BYTES_PER_S
        assert bound - 0.1 < waited < bound + 1.0 and not stalled.usable()
        # The value still to send is dropped with the connection, not kept for a Redis that may never take it.
        [conn] = opened
        assert conn.transport.is_closing() and conn.transport.get_write_buffer_size() == 0
    finally:
        await stalled.close()


async def test_a_redis_that_stalls_mid_value_costs_a_bounded_wait(redis_url):
    """The sizes come, the value stops after 1 MB: the read fails after 1 s plus 1 s per 25 MB, and the circuit
    opens as for a hung Redis."""
    import redis as sync_redis

    from services.common.cache import VALUE_BYTES_PER_S, TIMEOUT_S

    value = big_value()
    sync_redis.Redis.from_url(redis_url).set("stall-test", value)
    cache = EmbeddingCache(Throttle(redis_url, rate=1e9, budget=1e6).url, ttl_s=60)
    try:
        start = time.monotonic()
        assert await cache.get_many(["stall-test"]) == [None]
        waited, bound = time.monotonic() - start, TIMEOUT_S + len(value) / VALUE_BYTES_PER_S
        assert bound - 0.1 < waited < bound + 1.0 and not cache.usable()
    finally:
        await cache.close()
