"""The embedding cache in Redis: keys, the value format, and the one place Redis errors are caught.

An outage of Redis degrades to "no cache": reads return misses, writes are dropped, both logged.
"""
import hashlib
import logging

import redis.asyncio as redis
from google.protobuf.message import DecodeError

from internvl.serving.v1 import serving_pb2 as pb

log = logging.getLogger(__name__)
# Byte widths of tensors.DTYPES, written out because the gateway reads cache values without torch.
_ITEMSIZE = {"uint8": 1, "float16": 2, "bfloat16": 2, "float32": 4}


def image_cache_key(namespace: str, fingerprint: str, image_sha256: str, max_num: int, use_thumbnail: bool,
                    tile_size: int) -> str:
    """Everything that changes an image's embeddings is in the key; `namespace` separates deployments."""
    params = f"{fingerprint}|{image_sha256}|{max_num}|{int(use_thumbnail)}|{tile_size}"
    return f"{namespace}:" + hashlib.sha256(params.encode()).hexdigest()


def encode_value(fingerprint: str, tiles: int, embeddings: pb.Tensor) -> bytes:
    return pb.CachedEmbeddings(fingerprint=fingerprint, tiles=tiles, embeddings=embeddings).SerializeToString()


def decode_value(data: bytes, fingerprint: str, tokens_per_tile: int) -> pb.CachedEmbeddings | None:
    """The cached value, or None if it is corrupt, from another model, or inconsistent with its header."""
    try:
        value = pb.CachedEmbeddings.FromString(data)
    except DecodeError:
        return None
    emb = value.embeddings
    if value.fingerprint != fingerprint or value.tiles <= 0 or len(emb.shape) != 2:
        return None
    if emb.shape[0] != value.tiles * tokens_per_tile or emb.dtype not in _ITEMSIZE:
        return None
    if len(emb.data) != emb.shape[0] * emb.shape[1] * _ITEMSIZE[emb.dtype]:
        return None
    return value


class EmbeddingCache:
    """Async Redis access with short timeouts; never raises to the caller."""

    def __init__(self, url: str | None, ttl_s: int):
        self.ttl_s = ttl_s
        self.client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0) if url else None

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        if self.client is None or not keys:
            return [None] * len(keys)
        try:
            return await self.client.mget(keys)
        except (redis.RedisError, OSError) as e:
            log.warning("redis read failed, serving uncached: %s", e)
            return [None] * len(keys)

    async def put(self, key: str, value: bytes) -> None:
        if self.client is None:
            return
        try:
            await self.client.set(key, value, ex=self.ttl_s)
        except (redis.RedisError, OSError) as e:
            log.warning("redis write failed: %s", e)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
