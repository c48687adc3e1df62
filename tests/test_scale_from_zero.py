"""Pools that scale to zero: with WAIT_FOR_POOLS=0 the gateway serves before any pool is up, a request waits for
them (counted in flight, the demand that wakes them) and is answered once they come up."""
import asyncio
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from services.gateway.chat import ChatService, Limits
from services.gateway.errors import ApiError
from tests.test_end_to_end import metric
from tools.run_local import ROOT, free_port


def wait_for(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_gateway_serves_before_its_pools_and_requests_wait_for_them(tiny_checkpoint, tmp_path):
    port = {n: free_port() for n in ("rest", "grpc", "vision", "decoder", "vm", "dm")}
    env = {**os.environ, "MODEL": str(tiny_checkpoint), "DEVICE": "cpu", "REDIS_URL": "", "PYTHONPATH": str(ROOT),
           "WAIT_FOR_POOLS": "0", "POOL_WAIT_S": "120"}
    url = f"http://127.0.0.1:{port['rest']}"
    procs = []

    def start(module: str, *args: str) -> None:
        procs.append(subprocess.Popen([sys.executable, "-m", f"services.{module}", *args], cwd=ROOT, env=env,
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))

    with open(tmp_path / "log", "w") as log, ThreadPoolExecutor(1) as pool:
        try:
            start("gateway", "--port", str(port["rest"]), "--grpc-port", str(port["grpc"]),
                  "--vision-addr", f"127.0.0.1:{port['vision']}", "--decoder-addr", f"127.0.0.1:{port['decoder']}")
            wait_for(lambda: httpx.get(url + "/health").status_code == 200, 60, "the gateway")
            assert httpx.get(url + "/ready").status_code == 200  # ready without pools: it must take the demand
            answer = pool.submit(httpx.post, url + "/v1/chat/completions", timeout=180, json={
                "model": tiny_checkpoint.name, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
            wait_for(lambda: metric(url + "/metrics", "gateway_requests_in_flight", api="rest") == 1, 30,
                     "the request to wait in flight")
            time.sleep(1)
            assert not answer.done()  # no pool yet: it waits rather than failing
            start("vision_encoder", "--port", str(port["vision"]), "--metrics-port", str(port["vm"]))
            start("llm_decoder", "--port", str(port["decoder"]), "--metrics-port", str(port["dm"]))
            r = answer.result(timeout=150)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
            assert metric(url + "/metrics", "gateway_requests_in_flight", api="rest") == 0
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)
    assert "Traceback" not in (tmp_path / "log").read_text()


async def test_a_request_gives_up_on_pools_that_do_not_come_up():
    never = asyncio.get_running_loop().create_future()
    chat = ChatService("m", None, never, None, None, Limits(pool_wait_s=0.2))
    with pytest.raises(ApiError) as e:
        await chat.pools_up()
    assert e.value.status == 503 and "did not come up" in e.value.message


async def test_a_call_waits_for_a_first_endpoint_of_a_pool_at_zero():
    from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
    from services.gateway.balancer import Balancer

    pool = Balancer("decoder", pb_grpc.LlmDecoderStub, wait_s=5)
    waiter = asyncio.create_task(pool._endpoints_up())
    await asyncio.sleep(0.2)
    assert not waiter.done()
    pool.set_endpoints(["127.0.0.1:1"])
    await asyncio.wait_for(waiter, 1)
    await pool.close()


async def test_readiness_follows_the_pools():
    from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
    from services.gateway.balancer import Balancer
    from services.gateway.chat import Pools

    vision, decoder = Balancer("vision", pb_grpc.VisionEncoderStub), Balancer("decoder", pb_grpc.LlmDecoderStub)
    chat = ChatService("m", None, Pools(vision, decoder, "", 256, 4096), None, None, Limits())
    assert not chat.ready()
    vision.set_endpoints(["127.0.0.1:1"])
    assert not chat.ready()
    decoder.set_endpoints(["127.0.0.1:2"])
    assert chat.ready()
    await vision.close()
    await decoder.close()
