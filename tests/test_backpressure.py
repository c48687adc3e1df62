"""Backpressure: beyond its limits a service refuses at once (429 with Retry-After / RESOURCE_EXHAUSTED, 413 for a
body too large) instead of queueing without bound, and keeps serving."""
import asyncio
import http.server
import threading
import time
import uuid

import grpc
import httpx
import openai
import pytest

from internvl.serving.v1 import serving_pb2 as pb
from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from tests.conftest import IMAGE_HOST, noise_image, png_bytes
from tools.run_local import start_stack


@pytest.fixture(scope="module")
def tight(tiny_checkpoint, redis_url, tmp_path_factory):
    """A stack whose gateway serves 2 requests at once and bodies up to 64 KiB and gives a generation 2 s, and whose
    decoder lets 1 wait."""
    with open(tmp_path_factory.mktemp("tight") / "stack.log", "w") as log:
        stack = start_stack(str(tiny_checkpoint), redis_url=redis_url, log=log, extra_env={
            "CACHE_NAMESPACE": f"tight-{uuid.uuid4().hex}", "MAX_CONCURRENT_REQUESTS": "2",
            "IMAGE_URL_ALLOW": IMAGE_HOST + "/32",
            "MAX_REQUEST_BYTES": str(64 * 1024), "MAX_WAITING": "1", "MAX_RUNNING": "1",
            "MAX_BATCHED_TOKENS": "64", "GENERATE_TIMEOUT_S": "2"})
        yield stack
        stack.stop()


def chat(max_tokens: int) -> dict:
    return {"model": "tiny-internvl2_5", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture(scope="module")
def slow_image():
    """An image server (on the address the stack may fetch from) that takes 3-4 s to answer: requests stay in flight."""
    class Slow(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            time.sleep(3 + int(self.path.strip("/").split(".")[0][-1]))  # /slow0.png: 3 s, /slow1.png: 4 s
            body = png_bytes(noise_image(64, 64, seed=5))
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer((IMAGE_HOST, 0), Slow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://{IMAGE_HOST}:{httpd.server_address[1]}/slow{{}}.png"
    httpd.shutdown()
    httpd.server_close()


async def test_the_gateway_refuses_beyond_its_concurrency_limit(tight, slow_image):
    def slow(i: int) -> dict:
        return chat(2) | {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": slow_image.format(i)}}]}]}

    async with httpx.AsyncClient(base_url=tight.gateway_url, timeout=120) as client:
        # Their images arrive 1 s apart, so they reach the decoder (which lets only 1 wait) one after the other.
        held = [asyncio.create_task(client.post("/v1/chat/completions", json=slow(i))) for i in range(2)]
        await asyncio.sleep(1)  # both are fetching their image now
        refused = await client.post("/v1/chat/completions", json=chat(2))
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
        assert (await client.post("/v1/chat/completions", json=chat(2))).status_code == 200  # slots came back


def test_a_body_too_large_is_a_413(tight):
    big = chat(2) | {"messages": [{"role": "user", "content": "x" * (65 * 1024)}]}
    r = httpx.post(tight.gateway_url + "/v1/chat/completions", json=big, timeout=30)
    assert r.status_code == 413 and "exceeds 65536 bytes" in r.json()["error"]["message"]
    with pytest.raises(openai.APIStatusError) as e:
        openai.OpenAI(base_url=tight.gateway_url + "/v1", api_key="x", max_retries=0).chat.completions.create(**big)
    assert e.value.status_code == 413


def test_the_decoder_refuses_when_its_queue_is_full(tight):
    with grpc.insecure_channel(tight.decoder_addr) as channel:
        decoder = pb_grpc.LlmDecoderStub(channel)
        request = pb.GenerateRequest(token_ids=[5, 6, 7], sampling=pb.SamplingParams(max_tokens=2000))
        running = decoder.Generate(request)  # MAX_RUNNING=1: this one runs,
        next(running)
        waiting = decoder.Generate(request)  # this one waits (MAX_WAITING=1),
        codes = []
        for _ in range(20):  # and once it is queued, the next is refused at once
            try:
                next(decoder.Generate(request))
            except grpc.RpcError as e:
                codes.append(e.code())
                break
        running.cancel()
        waiting.cancel()
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED]


async def test_the_vision_pool_refuses_beyond_its_queued_tiles(cfg):
    """With tiles already queued, a request that would pass the bound is refused at once (an empty queue takes any)."""
    import numpy as np

    from services.common.tensors import to_proto
    from services.vision_encoder.server import VisionEncoderServicer

    class Batcher:
        queued_tiles = 10

        async def encode(self, images):
            raise AssertionError("a refused request must not be queued")

    class Context:
        async def abort(self, code, details):
            raise grpc.RpcError(code, details)

    size = cfg.vision.image_size
    tiles = to_proto(__import__("torch").from_numpy(np.zeros((4, size, size, 3), dtype=np.uint8)))
    servicer = VisionEncoderServicer(cfg, Batcher(), None, pb.ModelInfo(), max_queued_tiles=12)
    with pytest.raises(grpc.RpcError) as e:
        await servicer.Encode(pb.EncodeRequest(images=[pb.ImageTiles(tiles=tiles)]), Context())
    assert e.value.args[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and "10 tiles are already queued" in e.value.args[1]


async def test_decoded_pixels_in_flight_are_bounded():
    from services.gateway.admission import PixelBudget

    budget, events = PixelBudget(100), []

    async def decode(name: str, pixels: int, seconds: float):
        async with budget.hold(pixels):
            events.append(("start", name, budget.used))
            await asyncio.sleep(seconds)
            events.append(("end", name, budget.used))

    await asyncio.gather(decode("a", 60, 0.2), decode("b", 60, 0.1), decode("c", 30, 0.1))
    assert max(used for _, _, used in events) <= 100  # b waits for a; c fits beside a
    names = [e[:2] for e in events]
    assert names.index(("end", "a")) < names.index(("start", "b")) and names.index(("start", "c")) < names.index(("end", "a"))
    await decode("huge", 500, 0)  # larger than the budget: runs alone
    assert budget.used == 0


def test_a_generation_past_its_deadline_ends_with_a_clear_error(tight):
    """GENERATE_TIMEOUT_S bounds a whole generation: a hung or endless one ends (503 here), it never hangs."""
    r = httpx.post(tight.gateway_url + "/v1/chat/completions", timeout=60,
                   json=chat(8000) | {"ignore_eos": True})
    assert r.status_code == 503 and "decoder" in r.json()["error"]["message"]
    assert httpx.post(tight.gateway_url + "/v1/chat/completions", json=chat(2), timeout=60).status_code == 200
