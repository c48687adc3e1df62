"""The embedding cache in Redis: keys, the value format, and the one place Redis errors are caught.

An outage of Redis degrades to "no cache": reads return misses, writes are dropped, both logged, and Redis is left
alone for a while before it is tried again.
"""
import asyncio
import hashlib
import logging
import time
from typing import Sequence

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge

from internvl.serving.v1 import serving_pb2 as pb

UP = Gauge("embedding_cache_up", "1 while Redis answers (0: serving without the embedding cache, or none configured)")
ERRORS = Counter("embedding_cache_errors_total", "Redis calls that failed (each opens the circuit for a while)")
log = logging.getLogger(__name__)
# Byte widths of tensors.DTYPES, written out because the gateway reads cache values without torch.
_ITEMSIZE = {"uint8": 1, "float16": 2, "bfloat16": 2, "float32": 4}
TIMEOUT_S = 1.0  # a command's (a hung Redis must cost little)
# A read of values may take TIMEOUT_S plus 1 s per this many bytes the process reads meanwhile (its own,
# those in flight, those of reads that start before it ends): a healthy Redis and a loaded gateway move hundreds of
# MB/s, so only a Redis that stalls mid-value meets the deadline.
BULK_READ_BYTES_PER_S = 25e6


def image_cache_key(namespace: str, fingerprint: str, image_sha256: str, max_num: int, use_thumbnail: bool,
                    tile_size: int) -> str:
    """Everything that changes an image's embeddings is in the key; `namespace` separates deployments."""
    params = f"{fingerprint}|{image_sha256}|{max_num}|{int(use_thumbnail)}|{tile_size}"
    return f"{namespace}:" + hashlib.sha256(params.encode()).hexdigest()


def encode_value(fingerprint: str, tiles: int, dtype: str, shape: Sequence[int], rows) -> bytes:
    """The value: CachedEmbeddings{fingerprint, tiles, embeddings: Tensor{dtype, shape, data: rows}}, byte for byte
    as SerializeToString writes it, the rows (any contiguous bytes-like object) copied once. Building the message
    would copy them three times more (upb copies a bytes field in, and a submessage through a serialization)."""
    rows = memoryview(rows).cast("B")
    return b"".join((_head(fingerprint, tiles, dtype, shape, rows.nbytes), rows))


def value_rows(data: bytes, value: pb.CachedEmbeddings) -> memoryview:
    """The rows' bytes in a value that `decode_value` accepted (it checked that they end the value), not copied."""
    return memoryview(data)[len(data) - _rows_size(value.embeddings):]


def decode_value(data: bytes, fingerprint: str | None, tokens_per_tile: int) -> pb.CachedEmbeddings | None:
    """The cached value, or None if it is corrupt, from another model, or inconsistent with its header.
    (fingerprint None: any model's; a reader that names values by keys, which hold the fingerprint.)"""
    try:
        value = pb.CachedEmbeddings.FromString(data)
    except DecodeError:
        return None
    emb = value.embeddings
    if fingerprint is not None and value.fingerprint != fingerprint:
        return None
    if value.tiles <= 0 or len(emb.shape) != 2:
        return None
    if emb.shape[0] != value.tiles * tokens_per_tile or emb.dtype not in _ITEMSIZE:
        return None
    # The rows' length from the value's, not from `emb.data` (a copy of 27 MB): the value must be exactly what
    # encode_value writes for this header and that many bytes of rows.
    rows = _rows_size(emb)
    if len(data) != len(_head(value.fingerprint, value.tiles, emb.dtype, emb.shape, rows)) + rows:
        return None
    return value


def _head(fingerprint: str, tiles: int, dtype: str, shape: Sequence[int], rows: int) -> bytes:
    """A value up to its `rows` bytes of rows, which end it: the fields before them as SerializeToString writes
    them."""
    tensor = pb.Tensor(dtype=dtype, shape=shape).SerializeToString() + _FIELD_3 + _varint(rows)
    header = pb.CachedEmbeddings(fingerprint=fingerprint, tiles=tiles).SerializeToString()
    return header + _FIELD_3 + _varint(len(tensor) + rows) + tensor


def _rows_size(emb: pb.Tensor) -> int:
    return emb.shape[0] * emb.shape[1] * _ITEMSIZE[emb.dtype]


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_FIELD_3 = bytes([3 << 3 | 2])  # the tag of field 3, length-delimited: Tensor.data and CachedEmbeddings.embeddings


def _claim(key: str) -> str:
    return key + ":claim"


# Owner-checked release of claims: delete, or shorten to ARGV[2] ms when it is > 0.
_RELEASE = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', key, ARGV[2]) else redis.call('DEL', key) end
  end
end
"""


class EmbeddingCache:
    """Async Redis access with short timeouts; never raises to the caller. After a failure the cache is skipped for
    `cooldown_s` (a circuit breaker), so an outage costs one timeout, not one per request; then it is tried again."""

    def __init__(self, url: str | None, ttl_s: int, cooldown_s: float = 5.0):
        self.ttl_s, self.cooldown_s = ttl_s, cooldown_s
        # One retry on a connection error: after Redis restarts, each pooled connection fails once ("closed by
        # server") and a new one works. Not on timeouts: a hung Redis must cost one timeout, not two.
        retry = Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
        self.client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S,
                                           retry=retry) if url else None
        # Values (27 MB for an 8B model's image) are read on their own connections under a deadline that grows with
        # the bytes being read (redis-py's socket timeout bounds a whole response, however large).
        self.bulk = redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT_S, retry=retry) if url else None
        self._reading = 0  # bytes of values being read now
        self._reads: set[asyncio.Timeout] = set()  # their deadlines
        self.open_until = 0.0  # monotonic time before which Redis is not tried
        UP.set(1 if self.client else 0)

    def usable(self) -> bool:
        """Configured and not in a cool-down after a failure."""
        return self.client is not None and time.monotonic() >= self.open_until

    def _failed(self, what: str, e: Exception) -> None:
        ERRORS.inc()
        UP.set(0)
        self.open_until = time.monotonic() + self.cooldown_s
        log.warning("redis %s failed, serving without the cache for %.0fs: %s", what, self.cooldown_s, e)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        """The values (None: absent). Their sizes first, under the short timeout (a hung Redis costs no more than
        for any command); then the values present, under a deadline for the bytes this process is reading."""
        sizes = await self.sizes(keys)
        present = [key for key, size in zip(keys, sizes) if size]
        if not present or not self.usable():  # usable: the circuit may have opened while the sizes came
            return [None] * len(keys)
        total = sum(sizes)
        for other in self._reads:  # they share the pipe with this read from now on
            if not other.expired():
                other.reschedule(other.when() + total / BULK_READ_BYTES_PER_S)
        self._reading += total
        deadline = asyncio.timeout(TIMEOUT_S + self._reading / BULK_READ_BYTES_PER_S)
        self._reads.add(deadline)
        try:
            async with deadline:
                values = iter(await self.bulk.mget(present))
        except (redis.RedisError, OSError) as e:  # TimeoutError is an OSError
            self._failed("read", e)
            return [None] * len(keys)
        finally:
            self._reads.discard(deadline)
            self._reading -= total
        UP.set(1)
        return [next(values) if size else None for size in sizes]

    async def sizes(self, keys: list[str]) -> list[int]:
        """Each value's size in bytes (0: absent), in one round trip: whether the cache holds an image's embeddings,
        without moving them."""
        return await self._each("read", keys, 0, lambda pipe, key: pipe.strlen(key))

    async def _each(self, what: str, keys: list[str], default, command) -> list:
        """`command(pipe, key)` for every key, pipelined in one round trip; `default` for each key when Redis is not
        usable or the call fails (which opens the circuit)."""
        if not keys or not self.usable():
            return [default] * len(keys)
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    command(pipe, key)
                results = await pipe.execute()
        except (redis.RedisError, OSError) as e:
            self._failed(what, e)
            return [default] * len(keys)
        UP.set(1)
        return results

    async def put(self, key: str, value: bytes) -> bool:
        """Whether the value was stored."""
        if not self.usable():
            return False
        try:
            await self.client.set(key, value, ex=self.ttl_s)
        except (redis.RedisError, OSError) as e:
            self._failed("write", e)
            return False
        return True

    async def claim(self, keys: list[str], owner: str, ttl_s: float) -> list[bool]:
        """Single flight across processes: for each key, whether this caller is the one to compute its value (nobody
        else holds the key's claim: SET NX with a TTL, so a claim outlives no crashed owner by more than `ttl_s`).
        Without a usable Redis every key is the caller's."""
        ms = int(ttl_s * 1000)
        return [bool(ok) for ok in await self._each("claim", keys, True,
                                                    lambda pipe, key: pipe.set(_claim(key), owner, nx=True, px=ms))]

    async def claimed(self, keys: list[str]) -> list[bool]:
        """Whether someone holds each key's claim (False without a usable Redis: nobody to wait for)."""
        return [bool(n) for n in await self._each("read", keys, False, lambda pipe, key: pipe.exists(_claim(key)))]

    async def release(self, keys: list[str], owner: str, linger_s: float = 0.0) -> None:
        """End the caller's claims: at once, or after `linger_s` (while a value written after the answer lands, so
        that waiters see it rather than compute it again). A claim that expired and is someone else's now is left
        alone."""
        if not keys or not self.usable():
            return
        try:
            await self.client.eval(_RELEASE, len(keys), *map(_claim, keys), owner, int(linger_s * 1000))
        except (redis.RedisError, OSError) as e:
            self._failed("release", e)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            await self.bulk.aclose()
