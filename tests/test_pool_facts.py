"""Pools that change under the gateway: each endpoint's facts (ModelInfo) are read on connection, after a reconnection
and on a sign of change; endpoints of another checkpoint stay out of rotation; the cache keys follow the vision pool
to new weights. In-process pools on loopback: the real vision servicer (tiny model) with a real Redis, fake decoders."""
import asyncio
import logging
import time
import uuid

import pytest
import redis.asyncio as redis
import torch
from prometheus_client import REGISTRY

from internvl.serving.v1 import serving_pb2 as pb
from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from services.common.cache import EmbeddingCache
from services.common.checkpoint import checkpoint_id
from services.common.grpc_utils import create_server
from services.gateway.balancer import Balancer
from services.gateway.chat import ChatService, Limits
from services.gateway.pools import Pools, same_checkpoint
from services.gateway.prompt import PromptBuilder
from services.gateway.schema import ChatCompletionRequest
from services.vision_encoder.encoder import TileBatcher, VisionRunner, load_vision_model
from services.vision_encoder.server import VisionEncoderServicer
from tests.conftest import data_url, noise_image
from tests.test_balancer import FakeDecoder, generate, serve_fake, wait_for
from tools.run_local import free_port


@pytest.fixture(scope="module")
def vision_model(tiny_checkpoint, cfg):
    return load_vision_model(cfg, tiny_checkpoint, "cpu", torch.float32)


class VisionPod:
    """The real vision servicer on `addr`, writing to Redis, reporting `fingerprint` as its weights."""

    def __init__(self, cfg, model, checkpoint: str, redis_url: str, fingerprint: str):
        self.batcher = TileBatcher(VisionRunner(model, "cpu", max_batch_tiles=16), max_wait_s=0.001)
        info = pb.ModelInfo(model="tiny", checkpoint=checkpoint, fingerprint=fingerprint, dtype="float32",
                            hidden_size=cfg.text.hidden_size, tokens_per_tile=cfg.tokens_per_tile)
        self.servicer = VisionEncoderServicer(cfg, self.batcher, EmbeddingCache(redis_url, 60), info)

    async def start(self, addr: str) -> "VisionPod":
        self.batcher.start()
        self.server = create_server()
        pb_grpc.add_VisionEncoderServicer_to_server(self.servicer, self.server)
        assert self.server.add_insecure_port(addr)
        await self.server.start()
        return self

    async def stop(self) -> None:
        await self.server.stop(None)
        self.batcher.worker.cancel()
        await self.servicer.cache.close()


def image_cache(result: str) -> float:
    return REGISTRY.get_sample_value("gateway_image_cache_total", {"result": result}) or 0.0


async def ask(chat: ChatService, seed: int) -> pb.GenerateRequest:
    [request] = await chat.prepare(ChatCompletionRequest(model="m", max_num=1, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(noise_image(32, 32, seed=seed))}},
        {"type": "text", "text": "Describe."}]}]))
    return request


async def cached_fingerprint(client: redis.Redis, key: str, timeout_s: float = 10.0) -> str:
    """The fingerprint in the value the vision pod wrote (after its answer) under `key`."""
    deadline = time.monotonic() + timeout_s
    while (raw := await client.get(key)) is None:
        assert time.monotonic() < deadline, f"nothing cached under {key}"
        await asyncio.sleep(0.02)
    return pb.CachedEmbeddings.FromString(raw).fingerprint


async def hit_after_miss(chat: ChatService, client: redis.Redis, seed: int, fingerprint: str) -> pb.GenerateRequest:
    """An image new to the current keys: a miss, encoded and cached with `fingerprint`; asked again: a hit."""
    misses = image_cache("miss")
    first = await ask(chat, seed)
    assert image_cache("miss") == misses + 1
    assert await cached_fingerprint(client, first.image_keys[0]) == fingerprint
    hits = image_cache("hit")
    again = await ask(chat, seed)
    assert image_cache("hit") == hits + 1 and again.image_keys == first.image_keys
    assert again.images[0].embeddings.data == first.images[0].embeddings.data
    return first


@pytest.fixture
async def vision_chat(tiny_checkpoint, cfg, redis_url):
    """A ChatService over a vision pool checked against the tiny checkpoint, and a Redis client."""
    vision = Balancer("vision encoder", pb_grpc.VisionEncoderStub, check=same_checkpoint(checkpoint_id(tiny_checkpoint)))
    decoder = Balancer("LLM decoder", pb_grpc.LlmDecoderStub)  # preparing a request does not call it
    pools = Pools(vision, decoder, tokens_per_tile=cfg.tokens_per_tile, max_model_len=4096)
    cache, client = EmbeddingCache(redis_url, 0), redis.Redis.from_url(redis_url)
    chat = ChatService("m", PromptBuilder(tiny_checkpoint, cfg), pools, cache, None, Limits(),
                       cache_namespace=f"test-{uuid.uuid4().hex}")
    yield chat, client
    await vision.close()
    await cache.close()
    await client.aclose()


@pytest.fixture
async def roll_vision_pod(vision_chat, vision_model, cfg, tiny_checkpoint, redis_url):
    """roll(fingerprint): a vision pod with these weights of the tiny checkpoint, always at the same address (a
    rolling update replaces the one before), returned once the gateway serves with its facts."""
    chat, _ = vision_chat
    addr, checkpoint, pods = f"127.0.0.1:{free_port()}", checkpoint_id(tiny_checkpoint), []

    async def roll(fingerprint: str) -> VisionPod:
        if pods:
            await pods.pop().stop()
        pods.append(await VisionPod(cfg, vision_model, checkpoint, redis_url, fingerprint).start(addr))
        chat.pools.vision.set_endpoints([addr])
        await wait_for(lambda: chat.pools.vision.endpoints and chat.pools.fingerprint == fingerprint,
                       f"the facts of weights {fingerprint}")
        return pods[-1]

    yield roll
    for pod in pods:
        await pod.stop()


async def test_cache_keys_follow_a_vision_pod_rolled_to_new_weights(vision_chat, roll_vision_pod):
    chat, client = vision_chat
    await roll_vision_pod("weights-1")
    before = await hit_after_miss(chat, client, seed=1, fingerprint="weights-1")
    # A rolling update: the pod at this address is replaced by one with other weights of the same checkpoint.
    await roll_vision_pod("weights-2")
    after = await hit_after_miss(chat, client, seed=1, fingerprint="weights-2")
    assert after.image_keys != before.image_keys  # the same image, keyed by the weights that encode it now


async def test_a_cache_value_of_other_weights_makes_the_gateway_read_the_facts_again(vision_chat, roll_vision_pod):
    """Weights that change without the connection dropping (e.g. a proxy in between): the cache values carry the
    new fingerprint; the first one read makes the gateway ask the pool again, and the keys follow."""
    chat, client = vision_chat
    pod = await roll_vision_pod("weights-1")
    await hit_after_miss(chat, client, seed=2, fingerprint="weights-1")

    pod.servicer.info.fingerprint = "weights-3"  # same process, same connection
    stale = await ask(chat, seed=3)  # keyed for weights-1, written by weights-3
    assert await cached_fingerprint(client, stale.image_keys[0]) == "weights-3"
    assert chat.pools.fingerprint == "weights-1"
    misses = image_cache("miss")
    await ask(chat, seed=3)  # the foreign value is not used...
    assert image_cache("miss") == misses + 1
    await wait_for(lambda: chat.pools.fingerprint == "weights-3", "the facts read again")  # ...but noticed
    await hit_after_miss(chat, client, seed=3, fingerprint="weights-3")


async def test_a_decoder_of_another_checkpoint_stays_out_of_rotation(tiny_checkpoint, caplog):
    checkpoint = checkpoint_id(tiny_checkpoint)
    ours = pb.ModelInfo(model="tiny", checkpoint=checkpoint, max_model_len=4096)
    good, other = FakeDecoder(info=ours), FakeDecoder(info=pb.ModelInfo(model="other", checkpoint="0123456789abcdef",
                                                                         max_model_len=2048))
    good_addr, other_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    servers = [await serve_fake(good, good_addr), await serve_fake(other, other_addr)]
    pool = "LLM decoder"
    endpoints = lambda state: REGISTRY.get_sample_value("gateway_pool_endpoints", {"pool": pool, "state": state})  # noqa: E731
    mismatches = REGISTRY.get_sample_value("gateway_pool_mismatch_total", {"pool": pool}) or 0.0
    balancer = Balancer(pool, pb_grpc.LlmDecoderStub, check=same_checkpoint(checkpoint))
    try:
        with caplog.at_level(logging.WARNING, logger="services.gateway.balancer"):
            balancer.set_endpoints([good_addr, other_addr])
            await wait_for(lambda: other_addr in balancer.refused() and good_addr in balancer.endpoints,
                           "both endpoints' facts")
        assert set(balancer.endpoints) == {good_addr}
        assert "other checkpoint 0123456789abcdef" in balancer.refused()[other_addr]
        assert (endpoints("serving"), endpoints("refused"), endpoints("unchecked")) == (1, 1, 0)
        assert REGISTRY.get_sample_value("gateway_pool_mismatch_total", {"pool": pool}) == mismatches + 1
        assert any(other_addr in r.getMessage() and "kept out of rotation" in r.getMessage()
                   and checkpoint in r.getMessage() for r in caplog.records), caplog.text
        for _ in range(4):
            assert (await generate(balancer))[-1].finish_reason == "length"
        assert (good.calls, other.calls) == (4, 0)
        assert Pools(balancer, balancer).max_model_len == 4096  # the refused one's context does not count

        # Restarted at the same address with the gateway's checkpoint: read again on reconnection, back in rotation.
        await servers[1].stop(None)
        other.info = ours
        servers[1] = await serve_fake(other, other_addr)
        await wait_for(lambda: set(balancer.endpoints) == {good_addr, other_addr}, "the endpoint back in rotation")
        assert (endpoints("serving"), endpoints("refused")) == (2, 0)
        await asyncio.gather(*(generate(balancer) for _ in range(4)))
        assert other.calls >= 1
    finally:
        await balancer.close()
        for s in servers:
            await s.stop(None)
