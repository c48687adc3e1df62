"""The gateway's one pipeline, shared by REST and gRPC: images -> cache or vision pool -> prompt -> decoder stream."""
import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
import httpx
import numpy as np

from internvl.serving.v1 import serving_pb2 as pb
from services.common.cache import EmbeddingCache, image_cache_key
from services.gateway.admission import Admission, PixelBudget
from services.gateway.auth import ApiKeys
from services.gateway.errors import ApiError, bad_request
from services.gateway.media import UrlPolicy, decode_image, fetch_image, image_hash, image_pixels
from services.gateway.metrics import IMAGE_CACHE
from services.gateway.pools import Pools
from services.gateway.prompt import PromptBuilder
from services.gateway.schema import ChatCompletionRequest, ImageURL
from services.gateway.tiling import tile_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    default_max_num: int = 12       # tiles per image when the request does not say
    max_num: int = 12               # the most a request may ask for
    max_images: int = 16
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 64 * 1024 * 1024
    fetch_timeout_s: float = 10.0
    vision_timeout_s: float = 120.0
    generate_timeout_s: float = 3600.0  # a whole generation, its stream included (a hung decoder ends, it never hangs)
    pool_wait_s: float = 300.0      # how long a request waits for pools that are not up (starting, scaled to zero)
    max_concurrent_requests: int = 256
    max_request_bytes: int = 64 * 1024 * 1024  # a chat request body (inline images included)
    max_decode_pixels: int = 256 * 1024 * 1024  # decoded pixels in flight over all requests (~1 GB of RGB(A))
    api_keys: tuple[str, ...] = ()  # clients must present one of these (none: the gateway is open)
    url_policy: UrlPolicy = UrlPolicy()  # where image URLs may lead (public addresses only by default)


@dataclass
class _Image:
    key: str                        # cache key
    tiles: int
    embeddings: pb.Tensor | None    # from the cache, or after encoding
    pixels: np.ndarray | None = None  # uint8 tiles of a cache miss


class ChatService:
    def __init__(self, model_name: str, prompt: PromptBuilder, pools: "Pools | asyncio.Future[Pools]", cache: EmbeddingCache,
                 http: httpx.AsyncClient, limits: Limits, tile_size: int = 448, use_thumbnail: bool = True,
                 cache_namespace: str = "ivl:emb"):
        self.model_name, self.prompt, self.cache = model_name, prompt, cache
        self._pools = pools  # or, until the pools have answered what they serve, a future of them
        self.http, self.limits, self.tile_size, self.use_thumbnail = http, limits, tile_size, use_thumbnail
        self.cache_namespace = cache_namespace
        self._encoding: dict[str, asyncio.Future] = {}  # cache key -> embeddings being computed for some request
        self.admission = Admission(limits.max_concurrent_requests)  # shared by REST and gRPC
        self.pixels = PixelBudget(limits.max_decode_pixels)
        self.api_keys = ApiKeys(list(limits.api_keys))

    @property
    def pools(self) -> Pools:
        return self._pools if isinstance(self._pools, Pools) else self._pools.result()  # past `pools_up`

    def ready(self) -> bool:
        """Whether to take traffic: both pools have an endpoint (pools that scale to zero: always, requests wait)."""
        if not isinstance(self._pools, Pools):
            return True
        return bool(self._pools.vision.endpoints and self._pools.decoder.endpoints)

    async def pools_up(self) -> None:
        """Wait (bounded) for pools that are not up yet: starting, or scaled to zero until this demand wakes them."""
        if not isinstance(self._pools, Pools) and not self._pools.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._pools), self.limits.pool_wait_s)
            except TimeoutError:
                raise ApiError(503, f"the model pools did not come up within {self.limits.pool_wait_s:g}s; retry later",
                               type="service_unavailable") from None

    async def prepare(self, req: ChatCompletionRequest, request_id: str | None = None) -> pb.GenerateRequest:
        """Validate, resolve every image to embeddings (cache first), and build the decoder request."""
        await self.pools_up()
        if req.model != self.model_name:
            raise ApiError(404, f"The model `{req.model}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")
        max_num = req.max_num or self.limits.default_max_num
        if max_num > self.limits.max_num:
            raise bad_request(f"max_num={max_num} exceeds the server's limit of {self.limits.max_num}", "max_num")
        images = req.images()
        if len(images) > self.limits.max_images:
            raise bad_request(f"{len(images)} images exceed the limit of {self.limits.max_images} per request",
                              "messages")
        request_id = request_id or uuid.uuid4().hex  # carried to both pools' logs
        # Template and tokenizer work off the event loop: a huge text must not stall every other request.
        prompt = await asyncio.to_thread(self.prompt.render, req.messages)  # validates the text before image work
        resolved = await self._resolve_images(images, max_num)
        token_ids = await asyncio.to_thread(self.prompt.expand, prompt, [img.tiles for img in resolved])
        if len(token_ids) >= self.pools.max_model_len:  # refused before the vision pool spends time on it
            raise bad_request(f"the prompt has {len(token_ids)} tokens (images included); the model's context is "
                              f"{self.pools.max_model_len}", "messages")
        await self._encode_misses(resolved, request_id)
        sampling = pb.SamplingParams(max_tokens=req.max_completion_tokens or req.max_tokens or 0,
                                     temperature=req.temperature, top_p=req.top_p,
                                     stop_token_ids=sorted(set(req.stop_token_ids) | set(
                                         () if req.ignore_eos else self.prompt.stop_token_ids)),
                                     seed=req.seed, top_k=req.top_k or 0,
                                     min_p=req.min_p or 0.0, repetition_penalty=req.repetition_penalty or 1.0,
                                     presence_penalty=req.presence_penalty or 0.0,
                                     frequency_penalty=req.frequency_penalty or 0.0)
        # The cache keys name each image's embeddings: the decoder reuses KV blocks of prompts with the same images.
        return pb.GenerateRequest(request_id=request_id, token_ids=token_ids,
                                  images=[img.embeddings for img in resolved], sampling=sampling,
                                  image_keys=[img.key for img in resolved])

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        """The decoder's stream; its errors become ApiErrors."""
        stream = self.pools.decoder.stream("Generate", request, timeout=self.limits.generate_timeout_s)
        try:
            async for response in stream:
                yield response
        except grpc.aio.AioRpcError as e:
            raise upstream_error("decoder", e) from e
        finally:
            await stream.aclose()  # the client went away (or we are done): the decoder frees the sequence

    async def _resolve_images(self, images: list[ImageURL], max_num: int) -> list[_Image]:
        """Each image's cache entry, or its tiles when there is none (CPU work, off the event loop)."""
        if not images:
            return []
        # A task group: the first image that fails cancels the other downloads of the request.
        try:
            async with asyncio.TaskGroup() as group:
                fetches = [group.create_task(self._fetch(img)) for img in images]
        except* ApiError as errors:
            raise errors.exceptions[0] from None
        datas = [f.result() for f in fetches]
        hashes = await asyncio.to_thread(lambda: [image_hash(d) for d in datas])
        keys = [image_cache_key(self.cache_namespace, self.pools.fingerprint, h, max_num, self.use_thumbnail,
                                self.tile_size) for h in hashes]
        resolved = []
        for key, raw in zip(keys, await self.cache.get_many(keys)):
            value = raw and self.pools.cached(raw)
            resolved.append(_Image(key, value.tiles, value.embeddings) if value else _Image(key, 0, None))
        misses = [(img, data) for img, data in zip(resolved, datas) if img.embeddings is None]
        IMAGE_CACHE.labels("hit").inc(len(resolved) - len(misses))
        IMAGE_CACHE.labels("miss").inc(len(misses))
        arrays = await asyncio.gather(*(self._decode(data, max_num) for _, data in misses))
        for (img, _), pixels in zip(misses, arrays):
            img.tiles, img.pixels = pixels.shape[0], pixels
        return resolved

    async def _encode_misses(self, images: list[_Image], request_id: str) -> None:
        """One Encode call for the images the cache did not have (the vision pool caches them). Single flight: an
        image that another request (or this one, twice) is encoding right now is awaited, not encoded again."""
        loop = asyncio.get_running_loop()
        futures: dict[str, asyncio.Future] = {}
        owned: list[_Image] = []
        for img in images:
            if img.embeddings is None and img.key not in futures:
                if img.key not in self._encoding:
                    self._encoding[img.key] = loop.create_future()
                    owned.append(img)
                futures[img.key] = self._encoding[img.key]
        if owned:
            request = pb.EncodeRequest(request_id=request_id, images=[
                pb.ImageTiles(tiles=pb.Tensor(dtype="uint8", shape=img.pixels.shape, data=img.pixels.tobytes()),
                              cache_key=img.key) for img in owned])
            try:
                response = await self.pools.vision.unary("Encode", request, timeout=self.limits.vision_timeout_s)
                for img, out in zip(owned, response.images):
                    futures[img.key].set_result(out.embeddings)
            except BaseException as e:  # the requests waiting on these images fail with this one
                error = upstream_error("vision encoder", e) if isinstance(e, grpc.aio.AioRpcError) else \
                    e if isinstance(e, ApiError) else ApiError(503, "the image's encoding was abandoned; retry",
                                                               type="service_unavailable")
                for img in owned:
                    futures[img.key].set_exception(error)
                    futures[img.key].exception()  # retrieved, also when nobody else waited
                if isinstance(e, grpc.aio.AioRpcError):
                    raise error from e
                raise
            finally:
                for img in owned:
                    del self._encoding[img.key]
        for img in images:
            if img.embeddings is None:
                img.embeddings = await futures[img.key]

    async def _fetch(self, image: ImageURL) -> bytes:
        if image._data is not None:
            return image._data
        return await fetch_image(image.url, self.http, self.limits.max_image_bytes, self.limits.fetch_timeout_s,
                                 self.limits.url_policy)

    async def _decode(self, data: bytes, max_num: int) -> np.ndarray:
        """Decode and tile off the event loop, within the budget of decoded pixels in flight."""
        async with self.pixels.hold(image_pixels(data)):
            return await asyncio.to_thread(self._tiles, data, max_num)

    def _tiles(self, data: bytes, max_num: int) -> np.ndarray:
        return tile_image(decode_image(data, self.limits.max_image_pixels), max_num=max_num,
                          use_thumbnail=self.use_thumbnail, tile_size=self.tile_size)


def upstream_error(pool: str, e: grpc.aio.AioRpcError) -> ApiError:
    """A pool's gRPC status as the client should see it."""
    code = e.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return bad_request(e.details() or f"{pool} rejected the request")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ApiError(429, f"{pool} is saturated, retry later", type="rate_limit_error")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return ApiError(503, f"{pool} unavailable: {e.details()}", type="service_unavailable")
    log.error("%s failed: %s %s", pool, code, e.details())
    return ApiError(500, f"{pool} failed", type="internal_error")
