"""The VisionEncoder gRPC servicer: validates tiles, encodes them through the batcher, caches the embeddings."""
import asyncio
import logging
import time

import grpc
import torch
from prometheus_client import Counter, Gauge, Histogram

from internvl.serving.v1 import serving_pb2 as pb
from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from services.common.cache import EmbeddingCache, value_parts
from services.common.checkpoint import ModelConfig
from services.common.settings import log_event
from services.common.tensors import DTYPE_NAMES, from_proto, tensor_bytes, to_proto
from services.vision_encoder.encoder import TileBatcher

log = logging.getLogger("vision_encoder")
REQUESTS = Counter("vision_encode_requests_total", "Encode calls", ["status"])
IMAGES = Counter("vision_images_encoded_total", "Images encoded")
RUNNING = Gauge("vision_requests_running", "Encode calls in progress")
CACHE_WRITES = Counter("vision_cache_writes_total", "Embeddings written to Redis (after answering, or before when "
                       "asked to answer by reference), dropped because too many writes were pending, or failed",
                       ["result"])
CACHE_WRITE_BYTES = Counter("vision_cache_write_bytes_total", "Bytes of embeddings written to Redis")
LATENCY = Histogram("vision_encode_seconds", "Encode call latency (queueing, forward passes)",
                    buckets=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0])


class VisionEncoderServicer(pb_grpc.VisionEncoderServicer):
    def __init__(self, cfg: ModelConfig, batcher: TileBatcher, cache: EmbeddingCache, info: pb.ModelInfo,
                 max_queued_tiles: int = 4096):
        self.cfg, self.batcher, self.cache, self.info = cfg, batcher, cache, info
        self.max_queued_tiles = max_queued_tiles
        self.max_pending_writes = 64
        self._writes: set[asyncio.Task] = set()  # cache writes in flight (kept referenced until done)

    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        # Context managers, not decorators: those would time the creation of the coroutine, not its run.
        start = time.perf_counter()
        with RUNNING.track_inprogress(), LATENCY.time():
            response = await self._encode(request, context)
        log_event(log, "encode", request_id=request.request_id, images=len(request.images),
                  tiles=sum(img.tiles.shape[0] for img in request.images), duration_s=round(time.perf_counter() - start, 4))
        return response

    async def _encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        try:
            images = [self._tiles(i, img.tiles) for i, img in enumerate(request.images)]
        except ValueError as e:
            REQUESTS.labels("invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        tiles = sum(t.shape[0] for t in images)
        if self.batcher.queued_tiles and self.batcher.queued_tiles + tiles > self.max_queued_tiles:
            REQUESTS.labels("refused").inc()  # refused at once rather than queued without bound
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.batcher.queued_tiles} tiles are already "
                                f"queued (limit {self.max_queued_tiles})")
        embeddings = await self.batcher.encode(images)
        values = [value_parts(self.info.fingerprint, tiles.shape[0], DTYPE_NAMES[e.dtype], e.shape, tensor_bytes(e))
                  if img.cache_key else None for img, tiles, e in zip(request.images, images, embeddings)]
        stored, response = set(), pb.EncodeResponse()
        if request.by_reference:
            # The reader (the decoder) takes the rows from the cache: written before the answer; the rows of an
            # image whose write failed travel inline.
            keyed = [i for i, v in enumerate(values) if v]
            start = time.perf_counter()
            written = await asyncio.gather(*(self.cache.put(request.images[i].cache_key, *values[i]) for i in keyed))
            response.store_s = time.perf_counter() - start
            stored = {i for i, ok in zip(keyed, written) if ok}
            for i in keyed:
                CACHE_WRITES.labels("written" if i in stored else "failed").inc()
                CACHE_WRITE_BYTES.inc(sum(map(len, values[i])) if i in stored else 0)
        else:
            for img, v in zip(request.images, values):
                if v:
                    self._write_behind(img.cache_key, v)
        # Built in place: a constructor or `images=[...]` would serialize and parse each image's rows once more.
        for i, (img, e) in enumerate(zip(request.images, embeddings)):
            answer = response.images.add()
            if i in stored:
                answer.cache_key, answer.rows = img.cache_key, e.shape[0]
            else:
                to_proto(e, answer.embeddings)
        REQUESTS.labels("ok").inc()
        IMAGES.inc(len(images))
        return response

    def _write_behind(self, key: str, value: tuple[bytes, memoryview]) -> None:
        """Cache writes never delay the answer: they run after it, a bounded number at a time (beyond that the
        value is not cached rather than queued)."""
        if len(self._writes) >= self.max_pending_writes:
            CACHE_WRITES.labels("dropped").inc()
            return
        task = asyncio.create_task(self.cache.put(key, *value))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        CACHE_WRITES.labels("written").inc()
        CACHE_WRITE_BYTES.inc(sum(map(len, value)))

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return self.info

    def _tiles(self, index: int, msg: pb.Tensor) -> torch.Tensor:
        size = self.cfg.vision.image_size
        if msg.dtype != "uint8" or len(msg.shape) != 4 or list(msg.shape[1:]) != [size, size, 3] or msg.shape[0] < 1:
            raise ValueError(f"images[{index}]: tiles must be uint8 [n>=1, {size}, {size}, 3], "
                             f"got {msg.dtype} {list(msg.shape)}")
        return from_proto(msg)

