"""Single flight across gateways: an image being encoded for one gateway (its claim in Redis) is waited for by the
others, never encoded twice; a claim whose owner died holds them no longer than its TTL."""
import asyncio
import hashlib
import time

import grpc
import httpx
import pytest
import redis

from internvl.serving.v1 import serving_pb2 as pb
from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from services.common.cache import image_cache_key
from tests.conftest import data_url, noise_image, png_bytes, start_gateway
from tests.test_end_to_end import MODEL, metric


@pytest.fixture(scope="module")
def second_gateway(stack, tiny_checkpoint, redis_url, tmp_path_factory):
    """Another gateway process over the stack's pools, Redis and cache namespace (as a second replica is)."""
    proc, url = start_gateway(stack, tiny_checkpoint, tmp_path_factory.mktemp("gateway2") / "gateway.log",
                              REDIS_URL=redis_url, CACHE_NAMESPACE=stack.cache_namespace, SINGLE_FLIGHT_TTL_S="1.5")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def chat(image_url: str) -> dict:
    return {"model": MODEL, "max_tokens": 3, "temperature": 0, "max_num": 2, "return_token_ids": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}}]}]}


async def test_two_gateways_encode_an_image_once(stack, second_gateway):
    image = data_url(noise_image(301, 207, seed=4321))
    before = metric(stack.vision_metrics_url, "vision_images_encoded_total")
    async with httpx.AsyncClient(timeout=60) as client:
        answers = await asyncio.gather(*(client.post(url + "/v1/chat/completions", json=chat(image))
                                         for url in [stack.gateway_url, second_gateway] * 4))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert len({tuple(a.json()["choices"][0]["token_ids"]) for a in answers}) == 1
    assert metric(stack.vision_metrics_url, "vision_images_encoded_total") == before + 1


def test_a_claim_whose_owner_died_holds_a_request_only_for_its_ttl(stack, second_gateway, redis_url):
    """A claim nobody will fulfil (its gateway died mid-encode): the request waits out the claim (1.5 s here), then
    encodes the image itself."""
    image = noise_image(222, 333, seed=5555)
    with grpc.insecure_channel(stack.vision_addrs[0]) as channel:
        fingerprint = pb_grpc.VisionEncoderStub(channel).Info(pb.InfoRequest()).fingerprint
    key = image_cache_key(stack.cache_namespace, fingerprint, hashlib.sha256(png_bytes(image)).hexdigest(), 2, True,
                          448)
    redis.Redis.from_url(redis_url).set(key + ":claim", "a-gateway-that-died", px=1500)
    taken_over = metric(second_gateway + "/metrics", "gateway_single_flight_total", outcome="taken_over")
    encoded = metric(stack.vision_metrics_url, "vision_images_encoded_total")
    start = time.monotonic()
    r = httpx.post(second_gateway + "/v1/chat/completions", json=chat(data_url(image)), timeout=60)
    assert r.status_code == 200, r.text
    assert 1.0 < time.monotonic() - start < 10
    assert metric(second_gateway + "/metrics", "gateway_single_flight_total", outcome="taken_over") == taken_over + 1
    assert metric(stack.vision_metrics_url, "vision_images_encoded_total") == encoded + 1
