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
from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from services.common.cache import EmbeddingCache, decode_value, image_cache_key
from services.gateway.errors import ApiError, bad_request
from services.gateway.media import decode_image, fetch_image, image_hash
from services.gateway.prompt import PromptBuilder
from services.gateway.schema import ChatCompletionRequest, ImageURL
from services.gateway.tiling import TILE_SIZE, tile_image

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


@dataclass(frozen=True)
class Pools:
    vision: pb_grpc.VisionEncoderStub
    decoder: pb_grpc.LlmDecoderStub
    fingerprint: str                # of the model both pools serve; part of every cache key
    tokens_per_tile: int


class ChatService:
    def __init__(self, model_name: str, prompt: PromptBuilder, pools: Pools, cache: EmbeddingCache,
                 http: httpx.AsyncClient, limits: Limits, use_thumbnail: bool = True, cache_namespace: str = "ivl:emb"):
        self.model_name, self.prompt, self.pools, self.cache = model_name, prompt, pools, cache
        self.http, self.limits, self.use_thumbnail = http, limits, use_thumbnail
        self.cache_namespace = cache_namespace

    async def prepare(self, req: ChatCompletionRequest) -> pb.GenerateRequest:
        """Validate, resolve every image to embeddings (cache first), and build the decoder request."""
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
        prompt = self.prompt.render(req.messages)  # validates the text before any image work
        embeddings, tiles = await self._embed_images(images, max_num)
        token_ids = self.prompt.expand(prompt, tiles)
        sampling = pb.SamplingParams(max_tokens=req.max_completion_tokens or req.max_tokens or 0,
                                     temperature=req.temperature, top_p=req.top_p,
                                     stop_token_ids=self.prompt.stop_token_ids, seed=req.seed)
        return pb.GenerateRequest(request_id=uuid.uuid4().hex, token_ids=token_ids, images=embeddings,
                                  sampling=sampling)

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        """The decoder's stream; its errors become ApiErrors."""
        call = self.pools.decoder.Generate(request)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as e:
            raise upstream_error("decoder", e) from e
        finally:
            call.cancel()  # the client went away (or we are done): the decoder frees the sequence

    async def _embed_images(self, images: list[ImageURL], max_num: int) -> tuple[list[pb.Tensor], list[int]]:
        datas = await asyncio.gather(*(self._fetch(img) for img in images))
        keys = [image_cache_key(self.cache_namespace, self.pools.fingerprint, image_hash(d), max_num,
                                self.use_thumbnail, TILE_SIZE) for d in datas]
        embeddings: list[pb.Tensor | None] = [None] * len(images)
        tiles = [0] * len(images)
        for i, raw in enumerate(await self.cache.get_many(keys)):
            value = raw and decode_value(raw, self.pools.fingerprint, self.pools.tokens_per_tile)
            if value:
                embeddings[i], tiles[i] = value.embeddings, value.tiles
        misses = [i for i, e in enumerate(embeddings) if e is None]
        if misses:
            # Decoding and resizing are CPU work: keep them off the event loop.
            arrays = await asyncio.gather(*(asyncio.to_thread(self._tiles, datas[i], max_num) for i in misses))
            request = pb.EncodeRequest(images=[
                pb.ImageTiles(tiles=pb.Tensor(dtype="uint8", shape=a.shape, data=a.tobytes()), cache_key=keys[i])
                for i, a in zip(misses, arrays)])
            try:
                response = await self.pools.vision.Encode(request, timeout=self.limits.vision_timeout_s)
            except grpc.aio.AioRpcError as e:
                raise upstream_error("vision encoder", e) from e
            for i, a, out in zip(misses, arrays, response.images):
                embeddings[i], tiles[i] = out.embeddings, a.shape[0]
        return embeddings, tiles

    async def _fetch(self, image: ImageURL) -> bytes:
        if image._data is not None:
            return image._data
        return await fetch_image(image.url, self.http, self.limits.max_image_bytes, self.limits.fetch_timeout_s)

    def _tiles(self, data: bytes, max_num: int) -> np.ndarray:
        return tile_image(decode_image(data, self.limits.max_image_pixels), max_num=max_num,
                          use_thumbnail=self.use_thumbnail)


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
