"""Values move on connections of their own (services.common.cache._ValueConnection): replies parsed whatever the
socket's chunking, commands byte for byte what redis-py sends, values read into the caller's buffer, and every way a
Redis URL can reach a server (password and database, TLS, a Unix socket) working as it does for redis-py."""
import asyncio
import os
import shutil
import subprocess
from unittest import mock

import numpy as np
import pytest
import redis as sync_redis
import redis.asyncio as redis
from hypothesis import given, settings, strategies as st
from prometheus_client import REGISTRY

from services.common.cache import EmbeddingCache, _command, _ValueConnection, decode_value, value_parts, value_rows
from tools.run_local import free_port, wait_for_redis


class FakeTransport:
    """What _ValueConnection needs of a transport; bytes from the 'server' are fed by `feed`."""

    def __init__(self):
        self.aborted, self.protocol = False, None

    def set_protocol(self, protocol):
        self.protocol = protocol

    def write(self, data):
        pass

    def is_closing(self):
        return self.aborted

    def abort(self):
        self.aborted = True

    def feed(self, data: bytes, chunks: list[int]) -> None:
        """Deliver `data` as the event loop would: into the protocol's buffers, at most `chunks[i]` bytes a time."""
        i = 0
        while data:
            buffer = self.protocol.get_buffer(-1)
            n = min(len(buffer), len(data), chunks[i % len(chunks)])
            buffer[:n] = data[:n]
            data = data[n:]
            self.protocol.buffer_updated(n)
            i += 1


def reply(value) -> bytes:
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, str):
        return b"+" + value.encode() + b"\r\n"
    return b"$%d\r\n" % len(value) + value + b"\r\n"


values = st.one_of(st.none(), st.integers(-5, 10**12), st.sampled_from(["OK", "QUEUED"]),
                   st.binary(max_size=300),
                   st.integers(65_000, 67_000).map(lambda n: os.urandom(n)))  # about the 64 KB scratch buffer
chunks = st.lists(st.sampled_from([1, 2, 5, 13, 100, 4096, 65_535, 65_536, 1 << 20]), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(st.lists(values, min_size=1, max_size=5), chunks)
def test_replies_are_parsed_whatever_the_chunking(replies, chunks):
    buffers = []

    def host_buffer(n):  # records the buffers values are read into
        buffers.append(np.empty(n, np.uint8))
        return buffers[-1]

    async def run():
        transport = FakeTransport()
        conn = _ValueConnection(None, transport)
        task = asyncio.ensure_future(conn.run([("GET", f"k{i}") for i in range(len(replies))]))
        await asyncio.sleep(0)
        transport.feed(b"".join(map(reply, replies)), chunks)
        got = await task
        assert not transport.aborted and conn.body is None and not conn.line and not conn.skip
        for want, value in zip(replies, got):
            if isinstance(want, bytes):
                assert bytes(value) == want and value.obj is buffers.pop(0)  # where it was read: not copied
            else:
                assert value == (want.encode() if isinstance(want, str) else want)

    with mock.patch("services.common.cache.host_buffer", host_buffer):
        asyncio.run(run())


async def test_an_error_reply_raises_and_nonsense_ends_the_connection():
    transport = FakeTransport()
    conn = _ValueConnection(None, transport)
    task = asyncio.ensure_future(conn.run([("GET", "a")]))
    await asyncio.sleep(0)
    transport.feed(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n", [7])
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        await task
    assert not transport.aborted  # an error reply is a reply: the connection is still in step

    for junk in (b"*2\r\n$1\r\na\r\n", b"$abc\r\n", b"$3\r\nabcXY", b"x" * 2000, b"$-7\r\n"):
        transport = FakeTransport()
        conn = _ValueConnection(None, transport)
        task = asyncio.ensure_future(conn.run([("GET", "a"), ("GET", "b")]))
        await asyncio.sleep(0)
        transport.feed(junk, [3])
        with pytest.raises(redis.ConnectionError, match="unexpected reply"):
            await task
        assert transport.aborted


def test_commands_are_what_redis_py_sends():
    pack = redis.Connection().pack_command
    rows = memoryview(np.arange(1000, dtype=np.uint16)).cast("B")
    assert b"".join(_command(("GET", "k:1"))) == b"".join(pack("GET", "k:1"))
    assert b"".join(map(bytes, _command(("SET", "k", (b"head", rows), "EX", "60")))) == \
        b"".join(pack("SET", "k", b"head" + bytes(rows), "EX", "60"))
    assert b"".join(_command(("SET", "k", (), "EX", "60"))) == b"".join(pack("SET", "k", b"", "EX", "60"))
    big = memoryview(np.arange(100_000, dtype=np.uint16)).cast("B")
    pieces = _command(("SET", "k", (b"head", big)))
    assert len(pieces) == 3 and pieces[1] is big  # the rows as they are; the rest joined around them
    assert b"".join(map(bytes, pieces)) == b"".join(pack("SET", "k", b"head" + bytes(big)))


def start(tmp_path, *args: str) -> subprocess.Popen:
    with open(tmp_path / "redis.log", "ab") as log:
        return subprocess.Popen(["redis-server", "--save", "", "--appendonly", "no", "--bind", "127.0.0.1", *args],
                                stdout=log, stderr=subprocess.STDOUT)


def servers(tmp_path):
    """(a redis-server, or None: the one before; a URL to it) for each way a URL reaches Redis."""
    port = free_port()
    yield start(tmp_path, "--port", str(port), "--requirepass", "s3cret"), \
        f"redis://:s3cret@127.0.0.1:{port}/3"
    yield None, f"redis://default:s3cret@127.0.0.1:{port}/5?protocol=3"
    sock = tmp_path / "redis.sock"
    yield start(tmp_path, "--port", "0", "--unixsocket", str(sock)), f"unix://{sock}?db=2"
    if not shutil.which("openssl"):
        return
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", tmp_path / "key.pem",
                    "-out", tmp_path / "cert.pem", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    port = free_port()
    yield start(tmp_path, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tmp_path / "cert.pem"),
                "--tls-key-file", str(tmp_path / "key.pem"), "--tls-auth-clients", "no"), \
        f"rediss://127.0.0.1:{port}/1?ssl_ca_certs={tmp_path / 'cert.pem'}"


async def test_values_move_over_every_kind_of_url(tmp_path):
    """A 3 MB value (many socket reads) stored and read back through a password and database, RESP3, a Unix socket
    and TLS; the database is the URL's (another client sees the value there and only there)."""
    rows = np.random.default_rng(0).integers(0, 1 << 16, (1536, 1024), dtype=np.uint16)
    procs, tried = [], []
    try:
        for proc, url in servers(tmp_path):
            procs += [proc] if proc else []
            wait_for_redis(url, procs[-1])
            cache = EmbeddingCache(url, ttl_s=60)
            errors = REGISTRY.get_sample_value("embedding_cache_errors_total")
            try:
                assert await cache.put("value-test", *value_parts("f", 6, "bfloat16", rows.shape, rows))
                raw, absent = await cache.get_many(["value-test", "absent"])
                value = decode_value(raw, "f", 256)
                assert absent is None and value.tiles == 6 and bytes(value_rows(raw, value)) == rows.tobytes()
                other = sync_redis.Redis.from_url(url)
                assert other.ttl("value-test") > 0 and other.strlen("value-test") == len(raw)
                other.execute_command("SELECT", 0)
                assert not other.exists("value-test")
                assert REGISTRY.get_sample_value("embedding_cache_errors_total") == errors and cache.usable()
            finally:
                await cache.close()
            tried.append(url.split(":", 1)[0])
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert tried[:3] == ["redis", "redis", "unix"] and (len(tried) == 4 or not shutil.which("openssl"))



async def test_value_connections_are_kept_for_the_next_transfers(redis_url):
    """Opening a value connection costs a connect and a handshake: transfers one after another use one."""
    opened, open_ = [], _ValueConnection.open

    async def counted(pool):
        opened.append(pool)
        return await open_(pool)

    cache = EmbeddingCache(redis_url, ttl_s=60)
    try:
        with mock.patch.object(_ValueConnection, "open", counted):
            for i in range(5):
                assert await cache.put(f"kept-test-{i}", b"v%d" % i)
                assert await cache.get_many([f"kept-test-{i}", "absent"]) == [b"v%d" % i, None]
        assert len(opened) == 1 and len(cache._idle) == 1
    finally:
        await cache.close()
