"""The LlmDecoder gRPC servicer: validates a request, hands it to the engine, streams tokens and text deltas."""
import asyncio
import logging
import hashlib
import math
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import grpc
import torch
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from tokenizers import Tokenizer

from internvl.serving.v1 import serving_pb2 as pb
from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from services.common.cache import EmbeddingCache, decode_value, value_rows
from services.common.settings import log_event
from services.common.tensors import DTYPES, cat_rows
from services.llm_decoder.detokenizer import Detokenizer, StopStrings, TextDecoder
from services.llm_decoder.engine.llm_engine import LLMEngine
from services.llm_decoder.engine.sampler import Logprobs
from services.llm_decoder.engine.sequence import SamplingParams, Sequence

log = logging.getLogger("llm_decoder")
MAX_LOGPROBS = 20  # alternatives per token at most (OpenAI's top_logprobs limit)
MAX_LOGIT_BIAS = 300  # biased tokens per request at most (OpenAI's limit): every step of the batch applies them
REQUESTS = Counter("decoder_requests_total", "Generate calls", ["finish_reason"])
RUNNING = Gauge("decoder_running_requests", "Generate calls in progress")
TOKENS = Counter("decoder_generated_tokens_total", "Tokens generated")
IMAGES = Counter("decoder_image_embeddings_total", "Images' embeddings received: inline, read from the embedding "
                 "cache by key, taken from this decoder's recent images by key (local), or missing in the cache (the "
                 "call fails with FAILED_PRECONDITION)", ["source"])
RECENT_BYTES = Gauge("decoder_recent_image_bytes", "Bytes of embeddings held in this decoder's recent images")
# vLLM's series (names, meaning and buckets), so KEDA recipes, dashboards and inference-aware routers work unchanged.
TTFT = Histogram("vllm:time_to_first_token_seconds", "Time from the request to its first token", ["model_name"],
                 buckets=[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                          20.0, 40.0, 80.0, 160.0, 640.0, 2560.0])
TPOT = Histogram("vllm:time_per_output_token_seconds", "Time between output tokens of a request", ["model_name"],
                 buckets=[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                          20.0, 40.0, 80.0])


class EngineCollector:
    """The engine's state, read at scrape time."""

    def __init__(self, engine: LLMEngine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        e, label = self.engine, {"model_name": self.model_name}

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=list(label))
            family.add_metric(list(label.values()), value)
            return family

        used = len(e.blocks.blocks) - len(e.blocks.free)
        yield gauge("vllm:num_requests_running", "Sequences being decoded or prefilled", len(e.scheduler.running))
        yield gauge("vllm:num_requests_waiting", "Sequences waiting for admission", e.num_waiting())
        yield gauge("vllm:kv_cache_usage_perc", "Share of KV blocks held by sequences (1 = full)",
                    used / len(e.blocks.blocks))
        yield CounterMetricFamily("decoder_prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache",
                                  value=e.scheduler.cached_tokens)
        yield CounterMetricFamily("decoder_computed_tokens", "Tokens run through the model (prefill and decode)",
                                  value=e.computed_tokens)


class RecentImages:
    """The embeddings this decoder last read from the cache, by key, up to `max_bytes` (least recently used first
    out): the next question about an image it has seen (a chat's next turn) takes them from here, not from Redis
    (27 MB for an 8B model's 13-tile image: 26 ms, 10 ms of them this process's CPU, on an EPYC VM's loopback;
    bench/results/cache-cpu-epyc-2026-11-30.md). A key names the model, the image's bytes and its tiling, so its
    rows never change. Held as read: the rows are only ever read (a sequence's embeddings may be a view of them)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.items: OrderedDict[str, tuple[pb.Tensor, memoryview]] = OrderedDict()

    def get(self, key: str, rows: int) -> tuple[pb.Tensor, memoryview] | None:
        """The image's (header, rows' bytes) if held with `rows` rows."""
        item = self.items.get(key)
        if item is None or item[0].shape[0] != rows:
            return None
        self.items.move_to_end(key)
        return item

    def put(self, key: str, header: pb.Tensor, data: memoryview) -> None:
        size = data.nbytes
        if size > self.max_bytes or key in self.items:
            return
        self.items[key] = header, data
        self.bytes += size
        while self.bytes > self.max_bytes:
            self.bytes -= self.items.popitem(last=False)[1][1].nbytes
        RECENT_BYTES.set(self.bytes)


@dataclass
class _Stream:
    """A Generate call's end of the engine's output."""
    final_only: bool
    start: float  # when the call arrived
    first: float | None = None  # when its first token came out of the engine
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class LlmDecoderServicer(pb_grpc.LlmDecoderServicer):
    def __init__(self, engine: LLMEngine, tokenizer: Tokenizer, image_token_id: int, vocab_size: int,
                 hidden_size: int, max_model_len: int, dtype: torch.dtype, info: pb.ModelInfo,
                 max_waiting: int = 1024, cache: EmbeddingCache | None = None, recent_bytes: int = 0):
        self.max_waiting, self.cache, self.recent = max_waiting, cache, RecentImages(recent_bytes)
        self.text, self.image_token_id, self.vocab_size = TextDecoder(tokenizer), image_token_id, vocab_size
        self.hidden_size, self.max_model_len, self.dtype, self.info = hidden_size, max_model_len, dtype, info
        self.streams: dict[str, _Stream] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.engine = engine
        engine.on_step = self.on_step

    def on_step(self, outputs: list[tuple[Sequence, int, str | None]]) -> None:
        """Engine thread -> the event loop: one wake-up per step for all of its tokens."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._deliver, outputs)

    def _deliver(self, outputs: list[tuple[Sequence, int, str | None]]) -> None:
        now = time.perf_counter()
        for seq, token, reason in outputs:
            stream = self.streams.get(seq.id)
            if stream is None:  # the caller has already gone
                continue
            if stream.first is None:
                stream.first = now
            if reason or not stream.final_only:  # a final-only call wakes once, at the end
                stream.queue.put_nowait((token, reason))

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        if self.engine.num_waiting() >= self.max_waiting:  # refused at once rather than queued without bound
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.max_waiting} requests are already waiting for this decoder")
        arrival = time.perf_counter()
        try:
            tensors = await self._image_tensors(request)
            read_s = time.perf_counter() - arrival
            seq = self._sequence(request, tensors)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except LookupError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        self.loop = asyncio.get_running_loop()
        # A final-only call wakes once, at the end, unless stop strings must be looked for as the text grows.
        stream = self.streams[seq.id] = _Stream(request.final_only and not request.sampling.stop, arrival)
        # An answer that continues the prompt's last message reads on from its text (a leading space kept).
        context = self.text.context(seq.prompt_ids) if request.continues_prompt else []
        stops = StopStrings(list(request.sampling.stop), request.sampling.include_stop_str)
        queue, detok = stream.queue, self.text.stream(context)
        model, delivered, last = self.info.model, 0, stream.start
        texted = bool(context)  # a text token came before: the next one's bytes keep their leading space
        answer = pb.GenerateResponse(embeddings_s=read_s)  # a final-only call's one message, gathered
        RUNNING.inc()
        reason = None
        try:
            self.engine.add(seq)
            while reason is None:
                # Whatever has arrived since the last message goes out in one: a slow reader costs fewer writes.
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                tokens, reason = [t for t, _ in items], items[-1][1]
                if reason == "error":
                    await context.abort(grpc.StatusCode.INTERNAL, "generation failed")
                if stream.final_only:
                    tokens = seq.output_ids
                now, later = time.perf_counter(), tokens
                if not delivered:
                    TTFT.labels(model).observe(stream.first - stream.start)
                    last, later = stream.first, tokens[1:]
                for _ in later:  # tokens read together arrived over the time since the previous one
                    TPOT.labels(model).observe((now - last) / len(later))
                last = now
                TOKENS.inc(len(tokens))
                if stream.final_only:  # the whole answer, and no stop string to look for
                    text, sent = self.text.decode(tokens, context), len(tokens)
                else:
                    text, sent, reason = self._text(detok, stops, tokens, reason, delivered, seq.params.min_tokens)
                    if reason and items[-1][1] is None:  # a stop string: free the sequence now, what follows is dropped
                        self.engine.abort(seq.id)
                tokens = tokens[:sent]
                logprobs = []
                for i, t in enumerate(tokens if seq.params.logprobs is not None else []):
                    logprobs.append(self._logprobs(t, seq.logprobs[delivered + i], first=not texted))
                    texted = texted or t not in self.text.special
                delivered += sent
                answer.token_ids.extend(tokens)
                answer.text += text
                answer.logprobs.extend(logprobs)
                if reason:
                    answer.finish_reason = reason
                    answer.usage.CopyFrom(pb.Usage(prompt_tokens=seq.num_prompt, completion_tokens=delivered,
                                                   cached_prompt_tokens=seq.cached_tokens or 0))
                if not request.final_only:
                    yield answer
                    answer = pb.GenerateResponse()
                elif reason:
                    answer.first_token_s = stream.first - stream.start
                    yield answer
        finally:
            if reason is None:  # the client went away (or the call failed): free the work
                self.engine.abort(seq.id)
            REQUESTS.labels(reason or "cancelled").inc()
            RUNNING.dec()
            self.streams.pop(seq.id, None)
            log_event(log, "generate", request_id=request.request_id or seq.id, finish_reason=reason or "cancelled",
                      prompt_tokens=seq.num_prompt, completion_tokens=delivered,
                      cached_prompt_tokens=seq.cached_tokens or 0,
                      duration_s=round(time.perf_counter() - stream.start, 4))

    @staticmethod
    def _text(detok: Detokenizer, stops: StopStrings, tokens: list[int], reason: str | None, delivered: int,
              min_tokens: int) -> tuple[str, int, str | None]:
        """The text of newly arrived tokens (after `delivered` others), how many of them to send (up to the one
        completing a stop string, from the min_tokens-th token on, as vLLM), and the finish reason ("stop" when a stop
        string ended the answer)."""
        text = ""
        for sent, token in enumerate(tokens, 1):
            piece, stopped = stops.push(detok.step(token), look=delivered + sent >= min_tokens)
            text += piece
            if stopped:
                return text, sent, "stop"
        if reason:
            piece, stopped = stops.push(detok.finish())
            return text + piece + ("" if stopped else stops.finish()), len(tokens), "stop" if stopped else reason
        return text, len(tokens), None

    def _logprobs(self, token: int, entry: Logprobs, first: bool) -> pb.TokenLogprobs:
        logprob, top = entry
        spell = lambda i, lp: pb.Logprob(token_id=i, logprob=lp, token=self.text.token_bytes(i, first))  # noqa: E731
        return pb.TokenLogprobs(chosen=spell(token, logprob), top=[spell(i, lp) for i, lp in top])

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return self.info

    async def _image_tensors(self, request: pb.GenerateRequest) -> list[tuple[pb.Tensor, bytes | memoryview]]:
        """Each image's rows, as (header, bytes): inline, or by key: from the recent images, else read from the
        embedding cache (all in one round trip; the bytes a view into the value). A value that is gone (evicted,
        expired, Redis down) raises LookupError: the caller sends the rows instead."""
        refs = [i for i, img in enumerate(request.images) if not img.HasField("embeddings")]
        if refs and self.cache is None:
            raise ValueError("images by cache_key, but this decoder has no embedding cache (REDIS_URL)")
        rows = {i: item for i in refs if (item := self.recent.get(request.images[i].cache_key,
                                                                  request.images[i].rows))}
        reads = [i for i in refs if i not in rows]
        raws = await self.cache.get_many([request.images[i].cache_key for i in reads]) if reads else []
        for i, raw in zip(reads, raws):
            value = raw and decode_value(raw, None, self.info.tokens_per_tile)
            if not value or value.embeddings.shape[0] != request.images[i].rows:
                IMAGES.labels("missing").inc()
                raise LookupError(f"images[{i}]: no usable embeddings under cache key {request.images[i].cache_key}")
            rows[i] = value.embeddings, value_rows(raw, value)
            self.recent.put(request.images[i].cache_key, *rows[i])
        IMAGES.labels("local").inc(len(refs) - len(reads))
        IMAGES.labels("cache").inc(len(reads))
        IMAGES.labels("inline").inc(len(request.images) - len(refs))
        return [rows[i] if i in rows else (img.embeddings, img.embeddings.data) for i, img in enumerate(request.images)]

    def _sequence(self, request: pb.GenerateRequest, tensors: list[tuple[pb.Tensor, bytes | memoryview]]) -> Sequence:
        """Check a request against the model and the limits; a bad one raises ValueError with the reason."""
        ids = list(request.token_ids)
        if not ids:
            raise ValueError("token_ids is empty")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        if len(request.sampling.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens")
        # A stop token outside the vocabulary could never end the answer, nor a bias reach a logit.
        for what, named in (("stop_token_ids", request.sampling.stop_token_ids),
                            ("logit_bias token ids", request.sampling.logit_bias)):
            if any(not 0 <= i < self.vocab_size for i in named):
                raise ValueError(f"{what} must be in [0, {self.vocab_size})")
        if not all(-100 <= v <= 100 for v in request.sampling.logit_bias.values()):  # NaN too
            raise ValueError("logit_bias values must be in [-100, 100]")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room in the {self.max_model_len}-token context")
        s = request.sampling
        room = self.max_model_len - len(ids)
        if s.max_tokens < 0 or s.max_tokens > room:
            raise ValueError(f"max_tokens={s.max_tokens} exceeds the {room} tokens left in the context "
                             f"({len(ids)} prompt tokens, context {self.max_model_len})")
        if not 0 <= s.min_tokens <= (s.max_tokens or room):
            raise ValueError(f"min_tokens={s.min_tokens} must be in [0, {s.max_tokens or room}] (max_tokens)")
        floats = (s.temperature, s.top_p, s.min_p, s.repetition_penalty, s.presence_penalty, s.frequency_penalty)
        if not all(math.isfinite(x) for x in floats):
            raise ValueError("sampling settings must be finite numbers")
        if not (s.temperature >= 0 and 0 <= s.top_p <= 1 and 0 <= s.min_p <= 1 and s.repetition_penalty >= 0
                and s.top_k >= -1):
            raise ValueError("temperature must be >= 0, top_p and min_p in [0, 1], repetition_penalty >= 0 and "
                             "top_k >= -1")
        if not all(request.sampling.stop):
            raise ValueError("stop strings must not be empty")
        if s.HasField("logprobs") and not 0 <= s.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}]")
        if request.image_keys and len(request.image_keys) != len(request.images):
            raise ValueError(f"{len(request.image_keys)} image_keys for {len(request.images)} images")
        for i, (msg, _) in enumerate(tensors):
            self._check_image(i, msg)
        params = SamplingParams(max_tokens=s.max_tokens or room, temperature=s.temperature, top_p=s.top_p or 1.0,
                                stop_token_ids=frozenset(s.stop_token_ids),
                                seed=s.seed if s.HasField("seed") else None, top_k=s.top_k, min_p=s.min_p,
                                repetition_penalty=s.repetition_penalty or 1.0, presence_penalty=s.presence_penalty,
                                frequency_penalty=s.frequency_penalty,
                                logprobs=s.logprobs if s.HasField("logprobs") else None,
                                logit_bias=tuple(sorted(s.logit_bias.items())), min_tokens=s.min_tokens)
        keys = list(request.image_keys) or [img.cache_key or hashlib.blake2b(data, digest_size=16).hexdigest()
                                            for img, (_, data) in zip(request.images, tensors)]
        return Sequence(id=uuid.uuid4().hex, prompt_ids=ids, params=params, image_token_id=self.image_token_id,
                        image_embeds=cat_rows(tensors).to(self.dtype) if tensors else None,
                        image_keys=[(key, msg.shape[0]) for key, (msg, _) in zip(keys, tensors)])

    def _check_image(self, index: int, msg: pb.Tensor) -> None:
        floating = msg.dtype in DTYPES and DTYPES[msg.dtype].is_floating_point
        if len(msg.shape) != 2 or msg.shape[1] != self.hidden_size or not floating:
            raise ValueError(f"images[{index}]: expected float embeddings [rows, {self.hidden_size}], "
                             f"got {msg.dtype} {list(msg.shape)}")
