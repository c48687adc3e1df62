"""The embedding cache in Redis: keys, the value format, and the one place Redis errors are caught.

An outage of Redis degrades to "no cache": reads return misses, writes are dropped, both logged, and Redis is left
alone for a while before it is tried again.
"""
import asyncio
import hashlib
import logging
import time
from collections import deque
from typing import Sequence

import numpy as np
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
# A read or write of values may take TIMEOUT_S plus 1 s per this many bytes the process moves meanwhile (its own,
# those in flight, those of transfers that start before it ends): a healthy Redis and a loaded gateway move hundreds
# of MB/s, so only a Redis that stalls mid-value meets the deadline.
VALUE_BYTES_PER_S = 25e6
# Value connections kept open for the next transfers (more are closed when done): opening one costs a connect and
# redis-py's handshake (2.2 ms on a 2-CPU VM), which up to this many transfers at a time do not pay.
IDLE_VALUE_CONNECTIONS = 32


def host_buffer(n: int) -> np.ndarray:
    """Memory for a value, not initialised (a bytearray is zeroed first: one more pass over 27 MB)."""
    return np.empty(n, np.uint8)


def image_cache_key(namespace: str, fingerprint: str, image_sha256: str, max_num: int, use_thumbnail: bool,
                    tile_size: int) -> str:
    """Everything that changes an image's embeddings is in the key; `namespace` separates deployments."""
    params = f"{fingerprint}|{image_sha256}|{max_num}|{int(use_thumbnail)}|{tile_size}"
    return f"{namespace}:" + hashlib.sha256(params.encode()).hexdigest()


def value_parts(fingerprint: str, tiles: int, dtype: str, shape: Sequence[int], rows) -> tuple[bytes, memoryview]:
    """The value, CachedEmbeddings{fingerprint, tiles, embeddings: Tensor{dtype, shape, data: rows}} byte for byte as
    SerializeToString writes it, in two parts: the fields before the rows, and the rows (any contiguous bytes-like
    object), not copied (`EmbeddingCache.put` sends them as they are). Building the message would copy them four
    times (upb copies a bytes field in, and a submessage through a serialization)."""
    rows = memoryview(rows).cast("B")
    return _head(fingerprint, tiles, dtype, shape, rows.nbytes), rows


def encode_value(fingerprint: str, tiles: int, dtype: str, shape: Sequence[int], rows) -> bytes:
    """The value in one piece (the rows copied once)."""
    return b"".join(value_parts(fingerprint, tiles, dtype, shape, rows))


def value_rows(data: bytes, value: pb.CachedEmbeddings) -> memoryview:
    """The rows' bytes in a value that `decode_value` accepted (it checked that they end the value), not copied."""
    return memoryview(data)[len(data) - _rows_size(value.embeddings):]


def decode_value(data: bytes, fingerprint: str | None, tokens_per_tile: int) -> pb.CachedEmbeddings | None:
    """The cached value's fields, its embeddings' dtype and shape but not their rows (`value_rows` views those in
    `data`), or None if it is corrupt, from another model, or inconsistent with its header.
    (fingerprint None: any model's; a reader that names values by keys, which hold the fingerprint.)"""
    value = read_fields(data)
    if value is None or fingerprint is not None and value.fingerprint != fingerprint:
        return None
    emb = value.embeddings
    if value.tiles <= 0 or len(emb.shape) != 2:
        return None
    if emb.shape[0] != value.tiles * tokens_per_tile or emb.dtype not in _ITEMSIZE:
        return None
    # The value must be exactly what encode_value writes for this header and that many bytes of rows.
    rows = _rows_size(emb)
    if len(data) != len(_head(value.fingerprint, value.tiles, emb.dtype, emb.shape, rows)) + rows:
        return None
    return value


def read_fields(data: bytes) -> pb.CachedEmbeddings | None:
    """A value parsed without its rows (None if it is not a CachedEmbeddings whose rows end it, as encode_value
    writes them): protobuf would copy them (27 MB for an 8B model's 13-tile image), and a holder of the parsed value
    would keep that copy beside the bytes read."""
    view = memoryview(data).cast("B")
    outer = _last_field(view, 0, len(view), 3)  # CachedEmbeddings.embeddings
    inner = outer and _last_field(view, outer[1], len(view), 3)  # its Tensor.data
    if not inner:
        return None
    try:
        value = pb.CachedEmbeddings.FromString(view[:outer[0]])
        value.embeddings.MergeFromString(view[outer[1]:inner[0]])
    except DecodeError:
        return None
    return value


def _last_field(buf: memoryview, start: int, end: int, number: int) -> tuple[int, int] | None:
    """(where its tag starts, where its bytes start) of length-delimited field `number` if it is the last field of
    the message buf[start:end], its bytes running to the end; None otherwise. Only tags and lengths are read."""
    pos = start
    while pos < end:
        at = pos
        key, pos = _read_varint(buf, pos, end)
        if key is None or key & 7 not in (0, 2):  # the value's fields are varints and length-delimited
            return None
        value, pos = _read_varint(buf, pos, end)  # a varint field's value, or the length of the bytes that follow
        if value is None:
            return None
        if key & 7 == 2:
            if key >> 3 == number and pos + value == end:
                return at, pos
            pos += value
    return None


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int | None, int]:
    value = shift = 0
    while pos < end and shift < 64:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos
    return None, pos


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


class _ValueConnection(asyncio.BufferedProtocol):
    """A connection that moves values of many MB: a GET's reply goes from the socket straight into a host_buffer,
    which the caller gets; a SET sends the value's parts as they are. redis-py opens it (TCP, TLS or a Unix socket,
    with the AUTH, HELLO and SELECT its URL asks for), then hands over its transport. redis-py's reply parser copies
    a 27 MB value four times, after asyncio's StreamReader has grown a buffer to hold it (realloc after realloc),
    and its SET joins the value to the command: a decoder's read and a vision pool's write of 27 MB took 2.7x and
    2.6x as long through redis-py on a 2-CPU VM (bench/results/cache-cpu-epyc-2026-11-30.md)."""

    def __init__(self, conn: redis.Connection, transport: asyncio.Transport):
        self.conn, self.transport = conn, transport  # conn closes the socket (disconnect)
        self.replies: deque[asyncio.Future] = deque()  # awaited, in the order the commands went
        self.line = bytearray()  # the first line of the reply being read, so far
        self.body: memoryview | None = None  # a bulk reply's buffer, `filled` bytes of it in
        self.filled = self.skip = 0  # skip: bytes still to drop (the CRLF after a bulk reply)
        self.scratch = memoryview(bytearray(1 << 16))  # what arrives outside a bulk reply's body
        self.lost: Exception | None = None
        transport.set_protocol(self)

    @classmethod
    async def open(cls, pool: redis.ConnectionPool) -> "_ValueConnection":
        conn = pool.make_connection()
        await conn.connect()
        return cls(conn, conn._writer.transport)  # the one private attribute: redis-py shows no transport

    async def close(self) -> None:
        # abort, not close: close would keep what is still to send (27 MB of a value) until a Redis that stalled
        # takes it, however long that is
        self.transport.abort()
        await self.conn.disconnect(nowait=True)

    async def run(self, commands: list[tuple]) -> list:
        """Send commands (their arguments: str, or bytes-like, or a tuple of bytes-like parts sent as one argument)
        pipelined, and return their replies: None, an int, bytes (a simple string), or a memoryview of the
        host_buffer a bulk reply was read into. A Redis error reply raises ResponseError."""
        replies = []
        for args in commands:
            for piece in _command(args):
                self.transport.write(piece)
            replies.append(asyncio.get_running_loop().create_future())
            self.replies.append(replies[-1])
        if self.lost:
            raise self.lost
        return await asyncio.gather(*replies)  # which also takes the errors of replies after a failed one

    # asyncio.BufferedProtocol
    def get_buffer(self, sizehint: int) -> memoryview:
        return self.body[self.filled:] if self.body is not None else self.scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self.body is not None:  # straight into the body
            self._filled(nbytes)
            return
        try:
            self._parse(self.scratch[:nbytes])
        except (ValueError, redis.RedisError) as e:  # the stream makes no sense: nothing more can be read
            self.transport.abort()
            self.connection_lost(redis.ConnectionError(f"unexpected reply from Redis: {e}"))

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            self.lost = exc if isinstance(exc, redis.ConnectionError) else \
                redis.ConnectionError(f"Redis closed the connection ({exc or 'end of stream'})")
        while self.replies:
            if not (future := self.replies.popleft()).done():
                future.set_exception(self.lost)

    def _parse(self, data: memoryview) -> None:
        while data:
            if self.skip:
                drop = min(self.skip, len(data))
                if bytes(data[:drop]) != b"\r\n"[2 - self.skip:2 - self.skip + drop]:
                    raise ValueError("a bulk reply does not end with CRLF")
                self.skip -= drop
                data = data[drop:]
            elif self.body is not None:  # a body's start, in the chunk that ended its first line
                n = min(len(self.body) - self.filled, len(data))
                self.body[self.filled:self.filled + n] = data[:n]
                data = data[n:]
                self._filled(n)
            else:
                end = bytes(data[:1024]).find(b"\n")
                if end < 0:
                    self.line += data
                    if len(self.line) > 1024:
                        raise ValueError("a reply's first line is over 1 KB")
                    return
                self.line += data[:end + 1]
                data = data[end + 1:]
                line, self.line = bytes(self.line), bytearray()
                self._reply(line)

    def _reply(self, line: bytes) -> None:
        if not line.endswith(b"\r\n") or not self.replies:
            raise ValueError(repr(line[:64]))
        kind, rest = line[:1], line[1:-2]
        if kind == b"$" and rest != b"-1":
            size = int(rest)
            if size < 0:
                raise ValueError(repr(line))
            self.body, self.filled = memoryview(host_buffer(size)), 0
            self._filled(0)  # an empty value is complete already
            return
        if kind in (b"$", b"_"):  # $-1: RESP2's null, _: RESP3's
            value = None
        elif kind == b"+":
            value = rest
        elif kind == b":":
            value = int(rest)
        elif kind == b"-":
            value = redis.ResponseError(rest.decode(errors="replace"))
        else:
            raise ValueError(repr(line[:64]))
        future = self.replies.popleft()
        if not future.done():  # cancelled: the caller went away, the reply is read all the same
            if isinstance(value, Exception):
                future.set_exception(value)
            else:
                future.set_result(value)

    def _filled(self, nbytes: int) -> None:
        """`nbytes` more of the bulk reply's body are in; a complete body is its command's reply."""
        self.filled += nbytes
        if self.filled == len(self.body):
            body, self.body, self.skip = self.body, None, 2
            if not (future := self.replies.popleft()).done():
                future.set_result(body)


def _command(args: tuple) -> list:
    """A command in RESP, as pieces to write: an argument given as a tuple of parts is sent as their concatenation
    (a value's fields and its rows). Parts over 64 KB (rows) are pieces of their own, not copied; the rest is joined
    (a write per piece may be a send each)."""
    out, small = [], [b"*%d\r\n" % len(args)]
    for arg in args:
        parts = [p.encode() if isinstance(p, str) else p for p in (arg if isinstance(arg, tuple) else (arg,))]
        small.append(b"$%d\r\n" % sum(memoryview(p).nbytes for p in parts))
        for part in parts:
            if memoryview(part).nbytes > 1 << 16:
                out += [b"".join(small), part]
                small = []
            else:
                small.append(part)
        small.append(b"\r\n")
    return out + [b"".join(small)]


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
        # Values (27 MB for an 8B model's image) move on connections of their own (_ValueConnection) under a
        # deadline that grows with the bytes being moved (a socket timeout would bound a whole response, however
        # large). This pool only makes them, with the URL's address, TLS and credentials.
        self.values = redis.ConnectionPool.from_url(url, socket_connect_timeout=TIMEOUT_S) if url else None
        self._idle: list[_ValueConnection] = []
        self._moving = 0  # bytes of values being moved now
        self._transfers: set[asyncio.Timeout] = set()  # their deadlines
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

    async def get_many(self, keys: list[str]) -> list[memoryview | None]:
        """The values (None: absent), each read into a host_buffer of its own. Their sizes first, under the short
        timeout (a hung Redis costs no more than for any command); then the values present, under a deadline for the
        bytes this process moves."""
        sizes = await self.sizes(keys)
        present = [key for key, size in zip(keys, sizes) if size]
        if not present or not self.usable():  # usable: the circuit may have opened while the sizes came
            return [None] * len(keys)
        try:
            values = iter(await self._transfer(sum(sizes), [("GET", key) for key in present]))
        except (redis.RedisError, OSError) as e:  # TimeoutError is an OSError
            self._failed("read", e)
            return [None] * len(keys)
        UP.set(1)
        return [next(values) if size else None for size in sizes]

    async def _transfer(self, size: int, commands: list) -> list:
        """Run commands that move `size` bytes of values on a value connection, under a deadline of TIMEOUT_S plus
        the time the bytes this process moves meanwhile take at VALUE_BYTES_PER_S. An idle connection that fails
        is replaced once (after Redis restarts, each fails once: "closed by server")."""
        for other in self._transfers:  # they share the pipe with this transfer from now on
            if not other.expired():
                other.reschedule(other.when() + size / VALUE_BYTES_PER_S)
        self._moving += size
        deadline = asyncio.timeout(TIMEOUT_S + self._moving / VALUE_BYTES_PER_S)
        self._transfers.add(deadline)
        try:
            async with deadline:
                if self._idle:
                    try:
                        return await self._run(self._idle.pop(), commands)
                    except redis.ConnectionError:  # Redis restarted since it was used, so did the other idle ones
                        while self._idle:
                            await self._idle.pop().close()
                return await self._run(await _ValueConnection.open(self.values), commands)
        finally:
            self._transfers.discard(deadline)
            self._moving -= size

    async def _run(self, conn: _ValueConnection, commands: list) -> list:
        """The commands' replies; the connection is kept for the next transfer only if it is in a known state."""
        try:
            replies = await conn.run(commands)
        except BaseException:  # an error, a timeout, a cancelled caller: replies may be left unread
            await conn.close()
            raise
        if len(self._idle) < IDLE_VALUE_CONNECTIONS:
            self._idle.append(conn)
        else:
            await conn.close()
        return replies

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

    async def put(self, key: str, *parts) -> bool:
        """Store a value given as its parts (bytes-like; stored as their concatenation, sent without copying them:
        see value_parts), under the deadline of a transfer of its size. Whether it was stored."""
        if not self.usable():
            return False
        expiry = ("EX", str(self.ttl_s)) if self.ttl_s else ()
        try:
            await self._transfer(sum(memoryview(p).nbytes for p in parts), [("SET", key, parts, *expiry)])
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
            while self._idle:
                await self._idle.pop().close()
            await self.values.aclose()
