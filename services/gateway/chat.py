"""The gateway's one pipeline, shared by REST and gRPC: images and video frames -> cache or vision pool -> prompt ->
decoder stream."""
import asyncio
import hashlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc
import httpx
import numpy as np

from internvl.serving.v1 import serving_pb2 as pb
from services.common.cache import EmbeddingCache, image_cache_key, value_rows
from services.gateway.admission import Admission, PixelBudget
from services.gateway.auth import ApiKeys
from services.gateway.errors import ApiError, bad_request
from services.gateway.media import UrlPolicy, fetch_image, image_hash, image_pixels, image_size
from services.gateway.metrics import IMAGE_CACHE, SINGLE_FLIGHT, Phases
from services.gateway.pools import Pools
from services.gateway.preprocess import Preprocessor, image_tiles
from services.gateway.prompt import Media, PromptBuilder
from services.gateway.schema import ChatCompletionRequest, ImagePart, ImageURL, VideoPart, VideoURL
from services.gateway.tiling import tile_count
from services.gateway.video import DEFAULT_NUM_SEGMENTS, probe_video, tile_hash, video_tiles

log = logging.getLogger(__name__)
CLAIM_POLL_S = 0.02     # how often a request waiting for another gateway's encoding looks for the value
CLAIM_LINGER_S = 1.0    # a claim's life after an answer whose value is written to the cache just after it


@dataclass(frozen=True)
class Limits:
    default_max_num: int = 12       # tiles per image when the request does not say
    max_num: int = 12               # the most a request may ask for
    max_images: int = 16
    max_n: int = 8                  # answers (choices) per request
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 64 * 1024 * 1024
    default_num_segments: int = DEFAULT_NUM_SEGMENTS  # frames per video when the request does not say
    max_num_segments: int = 32      # the most a request may ask for
    max_videos: int = 4
    max_video_bytes: int = 64 * 1024 * 1024
    max_video_frames: int = 100_000  # frames in the container (indexing them all is the cost)
    max_video_pixels: int = 3840 * 2160  # per frame, as declared and as decoded
    fetch_timeout_s: float = 10.0
    vision_timeout_s: float = 120.0
    single_flight_ttl_s: float = 15.0  # the longest another gateway's claim on an image holds this one's request
    generate_timeout_s: float = 3600.0  # a whole generation, its stream included (a hung decoder ends, it never hangs)
    pool_wait_s: float = 300.0      # how long a request waits for pools that are not up (starting, scaled to zero)
    max_concurrent_requests: int = 256
    max_request_bytes: int = 64 * 1024 * 1024  # a chat request body (inline images included)
    max_decode_pixels: int = 256 * 1024 * 1024  # decoded pixels in flight over all requests (~1 GB of RGB(A))
    api_keys: tuple[str, ...] = ()  # clients must present one of these (none: the gateway is open)
    # Request fields -> values a request that does not set them gets (the checkpoint's generation_config.json)
    sampling_defaults: dict = field(default_factory=dict)
    url_policy: UrlPolicy = UrlPolicy()  # where image URLs may lead (public addresses only by default)


@dataclass
class _Image:
    key: str                        # cache key
    tiles: int
    embeddings: pb.ImageEmbeddings | None  # the rows (from the cache, or encoded) or, by reference, their cache key
    pixels: np.ndarray | None = None  # uint8 tiles of a cache miss


class ChatService:
    def __init__(self, model_name: str, prompt: PromptBuilder, pools: "Pools | asyncio.Future[Pools]", cache: EmbeddingCache,
                 http: httpx.AsyncClient, limits: Limits, tile_size: int = 448, use_thumbnail: bool = True,
                 cache_namespace: str = "ivl:emb", preprocess: Preprocessor | None = None):
        self.model_name, self.prompt, self.cache = model_name, prompt, cache
        self._pools = pools  # or, until the pools have answered what they serve, a future of them
        self.http, self.limits, self.tile_size, self.use_thumbnail = http, limits, tile_size, use_thumbnail
        self.cache_namespace = cache_namespace
        # (cache key, by reference) -> embeddings being computed for some request
        self._encoding: dict[tuple[str, bool], asyncio.Future] = {}
        self.instance = uuid.uuid4().hex  # names this gateway's claims in Redis
        self.admission = Admission(limits.max_concurrent_requests)  # shared by REST and gRPC
        self.pixels = PixelBudget(limits.max_decode_pixels)
        self.preprocess = preprocess or Preprocessor()  # its workers start on the first image
        self.api_keys = ApiKeys(list(limits.api_keys))
        self.stopping = False  # set on SIGTERM: not ready, still serving while balancers notice

    @property
    def pools(self) -> Pools:
        return self._pools if isinstance(self._pools, Pools) else self._pools.result()  # past `pools_up`

    def ready(self) -> bool:
        """Whether to take traffic: not stopping, and both pools have an endpoint (pools that scale to zero: always,
        requests wait)."""
        if self.stopping:
            return False
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

    def check_model(self, model: str) -> None:
        """404 (OpenAI's model_not_found) for a model this server does not serve."""
        if model != self.model_name:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    async def prepare(self, req: ChatCompletionRequest, request_id: str | None = None, by_reference: bool = True,
                      phases: Phases | None = None) -> list[pb.GenerateRequest]:
        """Validate, resolve every image to embeddings (cache first), and build the decoder requests: one per choice
        (the decoder's prefix cache computes their shared prompt once).

        By reference (a decoder that reads the cache, and a cache that answers): images the cache holds, or that the
        vision pool stored, go to the decoder as cache keys; the gateway never moves their rows."""
        await self.pools_up()
        phases = phases or Phases()
        by_reference = by_reference and self.cache.usable() and self.pools.decoder_reads_cache
        self.check_model(req.model)
        req, default_length = self._with_defaults(req)
        max_num = self._max_num(req.max_num or self.limits.default_max_num, "max_num")
        if req.n > self.limits.max_n:
            raise bad_request(f"n={req.n} exceeds the server's limit of {self.limits.max_n}", "n")
        videos = [p.video_url for m in req.messages for p in m.parts() if isinstance(p, VideoPart)]
        for what, count, limit in (("images", len(req.images()), self.limits.max_images),
                                   ("videos", len(videos), self.limits.max_videos)):
            if count > limit:
                raise bad_request(f"{count} {what} exceed the limit of {limit} per request", "messages")
        for video in videos:  # before the prompt gets a line per frame
            if video.num_segments and video.num_segments > self.limits.max_num_segments:
                raise bad_request(f"num_segments={video.num_segments} exceeds the server's limit of "
                                  f"{self.limits.max_num_segments}", "num_segments")
        request_id = request_id or uuid.uuid4().hex  # carried to both pools' logs
        # Template and tokenizer work off the event loop: a huge text must not stall every other request.
        with phases("prompt"):
            prompt, media = await asyncio.to_thread(  # validates the text before image work
                self.prompt.render, req.messages, self.limits.default_num_segments, req.add_generation_prompt,
                req.continue_final_message)
        tiles_cap = [self._image_cap(p.image_url, max_num) if isinstance(p, ImagePart) else max_num for p in media]
        resolved = await self._resolve_media(media, tiles_cap, by_reference, phases)
        with phases("prompt"):
            token_ids = await asyncio.to_thread(self.prompt.expand, prompt, [img.tiles for img in resolved])
        # Refused before the vision pool spends time on them: a prompt over the context, a length beyond its room (a
        # default length is cut to the room).
        if len(token_ids) >= self.pools.max_model_len:
            raise bad_request(f"the prompt has {len(token_ids)} tokens (images included); the model's context is "
                              f"{self.pools.max_model_len}", "messages")
        room = self.pools.max_model_len - len(token_ids)
        asked, param = (req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens else \
            (req.max_tokens, "max_tokens")
        if not default_length and asked is not None and asked > room:
            raise bad_request(f"{param}={asked} exceeds the {room} tokens left in the model's "
                              f"{self.pools.max_model_len}-token context by the {len(token_ids)}-token prompt", param)
        with phases("vision"):
            await self._encode_misses(resolved, request_id, by_reference, phases)
        sampling = pb.SamplingParams(max_tokens=min(req.max_tokens, room) if default_length else asked or 0,
                                     temperature=req.temperature, top_p=req.top_p,
                                     stop_token_ids=sorted(set(req.stop_token_ids) | set(
                                         () if req.ignore_eos else self.prompt.stop_token_ids)),
                                     seed=req.seed, top_k=req.top_k or 0,
                                     min_p=req.min_p or 0.0, repetition_penalty=req.repetition_penalty or 1.0,
                                     presence_penalty=req.presence_penalty or 0.0,
                                     frequency_penalty=req.frequency_penalty or 0.0, stop=req.stop,
                                     include_stop_str=req.include_stop_str_in_output,
                                     logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                                     logit_bias=req.logit_bias, min_tokens=req.min_tokens)
        # The cache keys name each image's embeddings: the decoder reuses KV blocks of prompts with the same images.
        request = pb.GenerateRequest(request_id=request_id, token_ids=token_ids, sampling=sampling,
                                     image_keys=[img.key for img in resolved], final_only=not req.stream,
                                     continues_prompt=req.continue_final_message)
        for img in resolved:  # CopyFrom: see `inline`
            request.images.add().CopyFrom(img.embeddings)
        requests = [request]
        for i in range(1, req.n):
            requests.append(choice := pb.GenerateRequest())
            choice.CopyFrom(request)
            if req.seed is not None:  # reproducible, and not the same answer n times
                choice.sampling.seed = choice_seed(req.seed, i)
        return requests

    def _with_defaults(self, req: ChatCompletionRequest) -> tuple[ChatCompletionRequest, bool]:
        """The request with the checkpoint's sampling defaults in the fields it does not set (null is not set), and
        whether its length is the default."""
        given = req.model_fields_set | ({"max_tokens"} if req.max_completion_tokens else set())
        unset = {k: v for k, v in self.limits.sampling_defaults.items() if k not in given}
        return (req.model_copy(update=unset) if unset else req), "max_tokens" in unset

    async def generate(self, requests: list[pb.GenerateRequest],
                       req: ChatCompletionRequest) -> AsyncIterator[tuple[int, pb.GenerateResponse]]:
        """The choices' decoder streams, merged: (choice index, response) as they come, in order within a choice.
        Every choice's first response comes before any other, so a request the decoder refuses fails before the
        client has seen an answer."""
        streams = [self._generate(r, req, i) for i, r in enumerate(requests)]
        pending = {asyncio.ensure_future(anext(s, None)): i for i, s in enumerate(streams)}
        try:
            await asyncio.gather(*pending)
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=pending.get):
                    i, response = pending.pop(task), task.result()
                    if response is not None:
                        pending[asyncio.ensure_future(anext(streams[i], None))] = i
                        yield i, response
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for s in streams:  # each closes its decoder call: the decoder frees the sequence
                await s.aclose()

    async def _generate(self, request: pb.GenerateRequest, req: ChatCompletionRequest, choice: int,
                        retry_inline: bool = True) -> AsyncIterator[pb.GenerateResponse]:
        """One decoder stream; its errors become ApiErrors. Embeddings sent by cache key that the decoder no longer
        finds there (evicted, Redis down) are sent again as rows, once: `req` is prepared again, inline."""
        # A chat's turns about an image go to the decoder that holds its KV blocks and rows (while its load allows).
        stream = self.pools.decoder.stream("Generate", request, timeout=self.limits.generate_timeout_s,
                                           affinity=request.image_keys[0] if request.image_keys else None)
        try:
            async for response in stream:
                yield response
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION or not retry_inline:
                raise upstream_error("decoder", e) from e
            log.warning("request %s: %s; sending the rows inline", request.request_id, e.details())
            inline = (await self.prepare(req, request.request_id, by_reference=False))[choice]
            async for response in self._generate(inline, req, choice, retry_inline=False):
                yield response
        finally:
            await stream.aclose()  # the client went away (or we are done): the decoder frees the sequence

    def _image_cap(self, image: ImageURL, max_num: int) -> int:
        """An image's most tiles: its own `max_dynamic_patch` (LMDeploy's), else its OpenAI `detail` (`low`: the whole
        image as one tile, OpenAI's fixed low-resolution view; `high`: as many as the server allows), else the
        request's."""
        if image.max_dynamic_patch:
            return self._max_num(image.max_dynamic_patch, "max_dynamic_patch")
        return {"low": 1, "high": self.limits.max_num}.get(image.detail, max_num)

    def _max_num(self, max_num: int, param: str) -> int:
        if max_num > self.limits.max_num:
            raise bad_request(f"{param}={max_num} exceeds the server's limit of {self.limits.max_num}", param)
        return max_num

    async def _resolve_media(self, media: list[Media], tiles_cap: list[int], by_reference: bool,
                             phases: Phases) -> list[_Image]:
        """Each image's and video frame's cache entry, or its tiles when there is none (CPU work, off the event
        loop); images and frames in prompt order. `tiles_cap`: each image's max_num. By reference, only whether the
        cache holds an image is asked; its tile count comes from the image's header."""
        if not media:
            return []
        # A task group: the first download that fails cancels the others of the request.
        try:
            with phases("fetch"):
                async with asyncio.TaskGroup() as group:
                    fetches = [group.create_task(self._fetch(p)) for p in media]
        except* ApiError as errors:
            raise errors.exceptions[0] from None
        datas = [f.result() for f in fetches]
        # An image is named by its encoded bytes, so a hit skips decoding. A frame is named by its tile's pixels:
        # right whatever container, codec or sampling produced it, shared by every request that samples it.
        with phases("preprocess"):
            videos = iter(await asyncio.gather(*(self._video(p.video_url, data) for p, data in zip(media, datas)
                                                 if isinstance(p, VideoPart))))

        def contents() -> list[tuple[str, int, bytes | np.ndarray]]:  # (hash, max_num, encoded image or tile)
            out = []
            for part, data, cap in zip(media, datas, tiles_cap):
                if isinstance(part, ImagePart):
                    out.append((image_hash(data), cap, data))
                else:
                    out += [(tile_hash(tile), 1, tile[None]) for tile in next(videos)]
            return out

        with phases("preprocess"):
            items = await asyncio.to_thread(contents)
        fingerprint = self.pools.fingerprint  # read from the pool's facts: once, not per image or frame
        keys = [image_cache_key(self.cache_namespace, fingerprint, h, cap, self.use_thumbnail, self.tile_size)
                for h, cap, _ in items]
        resolved = []
        if by_reference:
            def tiles(size: int, item: tuple[str, int, bytes | np.ndarray]) -> int:
                _, cap, content = item
                if not size:
                    return 0
                if not isinstance(content, bytes):  # a video frame: one tile
                    return 1
                width, height = image_size(content)
                return width and height and tile_count(width, height, cap, use_thumbnail=self.use_thumbnail,
                                                       tile_size=self.tile_size)

            with phases("cache"):
                sizes = await self.cache.sizes(keys)
            with phases("preprocess"):
                counts = await asyncio.to_thread(lambda: [tiles(size, item) for size, item in zip(sizes, items)])
            for key, n in zip(keys, counts):
                rows = n * self.pools.tokens_per_tile
                resolved.append(_Image(key, n, pb.ImageEmbeddings(cache_key=key, rows=rows) if n else None))
        else:
            with phases("cache"):
                raws = await self.cache.get_many(keys)
            for key, raw in zip(keys, raws):
                value = raw and self.pools.cached(raw)
                resolved.append(_Image(key, value.tiles, inline(value, raw)) if value else _Image(key, 0, None))
        misses = [(img, item) for img, item in zip(resolved, items) if img.embeddings is None]
        IMAGE_CACHE.labels("hit").inc(len(resolved) - len(misses))
        IMAGE_CACHE.labels("miss").inc(len(misses))
        with phases("preprocess"):
            decoded = iter(await asyncio.gather(*(self._decode(content, cap) for _, (_, cap, content) in misses
                                                  if isinstance(content, bytes))))
        for img, (_, _, content) in misses:
            img.pixels = next(decoded) if isinstance(content, bytes) else content
            img.tiles = img.pixels.shape[0]
        return resolved

    async def _encode_misses(self, images: list[_Image], request_id: str, by_reference: bool,
                             phases: Phases) -> None:
        """One Encode call for the images the cache did not have (the vision pool caches them). Single flight: an
        image that another request (or this one, twice) is encoding right now is awaited, not encoded again."""
        loop = asyncio.get_running_loop()
        futures: dict[str, asyncio.Future] = {}
        owned: list[_Image] = []
        for img in images:
            if img.embeddings is None and img.key not in futures:
                flight = (img.key, by_reference)  # an inline request cannot use an answer by reference
                if flight not in self._encoding:
                    self._encoding[flight] = loop.create_future()
                    owned.append(img)
                futures[img.key] = self._encoding[flight]
        if owned:
            try:
                for img, out in zip(owned, await self._obtain(owned, request_id, by_reference, phases)):
                    futures[img.key].set_result(out)
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
                    del self._encoding[(img.key, by_reference)]
        for img in images:
            if img.embeddings is None:
                img.embeddings = await futures[img.key]

    async def _obtain(self, images: list[_Image], request_id: str, by_reference: bool,
                      phases: Phases) -> list[pb.ImageEmbeddings]:
        """Embeddings of images no request of this gateway is encoding: stored since this request looked (an
        encoding that ended in between), from another gateway that is encoding them (it holds the image's claim in
        Redis: wait for the value it stores), else from one Encode call here."""
        owner = f"{self.instance}:{request_id}"
        ours = await self.cache.claim([img.key for img in images], owner, self.limits.single_flight_ttl_s)
        try:
            found = {img.key: v for img, v in zip(images, await self._lookup(images, by_reference)) if v}
            found |= await self._wait_for_others(
                [img for img, mine in zip(images, ours) if not mine and img.key not in found], by_reference)
            if encode := [img for img in images if img.key not in found]:
                # Built in place: nested constructors serialize and parse each image's tiles once more (13 tiles:
                # 33 -> 17 ms with the serialization).
                request = pb.EncodeRequest(request_id=request_id, by_reference=by_reference)
                for img in encode:
                    tiles = request.images.add(cache_key=img.key).tiles
                    tiles.dtype, tiles.data = "uint8", img.pixels.tobytes()
                    tiles.shape[:] = img.pixels.shape
                response = await self.pools.vision.unary("Encode", request, timeout=self.limits.vision_timeout_s)
                phases.split("vision", "store", response.store_s)
                found.update((img.key, out) for img, out in zip(encode, response.images))
        finally:
            # By reference the value was stored before the answer; otherwise it is written just after it: the
            # claim lingers a moment so that waiters find the value rather than encode the image again.
            await self.cache.release([img.key for img, mine in zip(images, ours) if mine], owner,
                                     0.0 if by_reference else CLAIM_LINGER_S)
        return [found[img.key] for img in images]

    async def _lookup(self, images: list[_Image], by_reference: bool) -> list[pb.ImageEmbeddings | None]:
        """What the cache holds for images whose tiles are known: their keys (by reference) or their rows."""
        keys = [img.key for img in images]
        if by_reference:
            return [pb.ImageEmbeddings(cache_key=img.key, rows=img.tiles * self.pools.tokens_per_tile) if size
                    else None for img, size in zip(images, await self.cache.sizes(keys))]
        raws = await self.cache.get_many(keys)
        values = [raw and self.pools.cached(raw) for raw in raws]
        return [inline(v, raw) if v and v.tiles == img.tiles else None for img, v, raw in zip(images, values, raws)]

    async def _wait_for_others(self, images: list[_Image], by_reference: bool) -> dict[str, pb.ImageEmbeddings]:
        """The embeddings other gateways store for `images`, polled while their claims last; an image whose claim
        ends without a value (its encoder failed or died) is left out, to be encoded here."""
        found: dict[str, pb.ImageEmbeddings] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.single_flight_ttl_s
        while images and loop.time() < deadline:
            await asyncio.sleep(CLAIM_POLL_S)
            values = await self._lookup(images, by_reference)
            held = iter(await self.cache.claimed([img.key for img, v in zip(images, values) if v is None]))
            waiting = []
            for img, value in zip(images, values):
                if value is not None:
                    found[img.key] = value
                    SINGLE_FLIGHT.labels("shared").inc()
                elif next(held):
                    waiting.append(img)
                else:
                    SINGLE_FLIGHT.labels("taken_over").inc()
            images = waiting
        SINGLE_FLIGHT.labels("taken_over").inc(len(images))  # claims that outlived the wait
        return found

    async def _fetch(self, part: Media) -> bytes:
        url, kind, max_bytes = ((part.image_url, "image", self.limits.max_image_bytes) if isinstance(part, ImagePart)
                                else (part.video_url, "video", self.limits.max_video_bytes))
        if url._data is not None:
            if len(url._data) > max_bytes:
                raise bad_request(f"{kind} larger than {max_bytes} bytes")
            return url._data
        return await fetch_image(url.url, self.http, max_bytes, self.limits.fetch_timeout_s, self.limits.url_policy,
                                 kind)

    async def _video(self, video: VideoURL, data: bytes) -> np.ndarray:
        """The video's frame tiles, decoded in a worker process within the budget of decoded pixels in flight."""
        limits = self.limits
        width, height = await self.preprocess.run(probe_video, data, limits.max_video_pixels)
        frames = video.num_segments or limits.default_num_segments
        async with self.pixels.hold(frames * width * height):
            return await self.preprocess.tiles(video_tiles, data, frames, video.bound,
                                               max_frames=limits.max_video_frames, max_pixels=limits.max_video_pixels,
                                               tile_size=self.tile_size, use_thumbnail=self.use_thumbnail,
                                               threads=self.preprocess.spare_threads())

    async def _decode(self, data: bytes, max_num: int) -> np.ndarray:
        """Decode and tile in a worker process, within the budget of decoded pixels in flight."""
        async with self.pixels.hold(image_pixels(data)):
            return await self.preprocess.tiles(image_tiles, data, self.limits.max_image_pixels, max_num,
                                               self.use_thumbnail, self.tile_size, self.preprocess.spare_threads())


def inline(value: pb.CachedEmbeddings, raw: memoryview) -> pb.ImageEmbeddings:
    """A cache value's rows (`raw`: the value as read), to send inline: protobuf takes bytes only, so they are copied
    into the message. A message holding rows moves by CopyFrom, one copy: the constructor and MergeFrom (also behind
    `append` and `images=[...]`) serialize and parse a submessage, ~10x a copy of 27 MB (protobuf's upb)."""
    image = pb.ImageEmbeddings()
    image.embeddings.CopyFrom(value.embeddings)
    image.embeddings.data = bytes(value_rows(raw, value))
    return image


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice `index` > 0 of a seeded request (choice 0 keeps the request's own seed)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest())


def total_usage(usages: list[pb.Usage | None]) -> pb.Usage | None:
    """A request's usage over its choices: the prompt counted once (as OpenAI), the completions summed; cached, the
    prompt tokens every choice found cached (a choice reusing the blocks another choice computed saved no work)."""
    done = [u for u in usages if u is not None]
    return pb.Usage(prompt_tokens=done[0].prompt_tokens, completion_tokens=sum(u.completion_tokens for u in done),
                    cached_prompt_tokens=min(u.cached_prompt_tokens for u in done)) if done else None


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
