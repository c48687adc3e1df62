"""Graceful shutdown of a pool and of the gateway: on SIGTERM it reports NOT_SERVING (the gateway also 503 on
/ready) at once, keeps serving for SHUTDOWN_DELAY_S, then takes no new calls and lets the streams in flight finish
within SHUTDOWN_GRACE_S, and exits."""
import json
import signal
import time
import uuid

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from internvl.serving.v1 import serving_pb2 as pb
from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from tools.run_local import start_stack


def test_a_decoder_finishes_its_streams_before_it_exits(tiny_checkpoint, tmp_path):
    with open(tmp_path / "stack.log", "w") as log:
        stack = start_stack(str(tiny_checkpoint), redis=False, log=log,
                            extra_env={"CACHE_NAMESPACE": uuid.uuid4().hex, "SHUTDOWN_DELAY_S": "2"})
    try:
        decoder = stack.procs["llm_decoder"]
        with grpc.insecure_channel(stack.decoder_addr) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            stream = pb_grpc.LlmDecoderStub(channel).Generate(
                pb.GenerateRequest(token_ids=[5, 6, 7], sampling=pb.SamplingParams(max_tokens=600)))
            tokens = list(next(stream).token_ids)
            decoder.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "still SERVING after SIGTERM"
                time.sleep(0.05)
            last = None
            for last in stream:  # the stream in flight runs to its end
                tokens += last.token_ids
            assert last.finish_reason == "length" and len(tokens) == 600
        assert decoder.wait(30) == 0
    finally:
        stack.stop()


def test_the_gateway_finishes_its_rest_and_grpc_streams_before_it_exits(tiny_checkpoint, tmp_path):
    tokens = 400
    with open(tmp_path / "stack.log", "w") as log:
        stack = start_stack(str(tiny_checkpoint), redis=False, log=log,
                            extra_env={"CACHE_NAMESPACE": uuid.uuid4().hex, "SHUTDOWN_DELAY_S": "2"})
    chat = {"model": "tiny-internvl2_5", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": tokens,
            "ignore_eos": True, "stream": True}
    try:
        gateway = stack.procs["gateway"]
        with grpc.insecure_channel(stack.gateway_grpc) as channel, \
                httpx.Client(base_url=stack.gateway_url, timeout=60) as client, \
                client.stream("POST", "/v1/chat/completions", json=chat) as rest:
            health = health_pb2_grpc.HealthStub(channel)
            stream = pb_grpc.GatewayStub(channel).ChatStream(pb.ChatRequest(
                model="tiny-internvl2_5", messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(text="Hi")])],
                max_tokens=tokens, ignore_eos=True))
            grpc_tokens = list(next(stream).token_ids)
            events = rest.iter_lines()
            assert next(events).startswith("data: ")
            gateway.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while client.get("/ready").status_code != 503:
                assert time.monotonic() < deadline, "still ready after SIGTERM"
                time.sleep(0.05)
            assert client.get("/ready").json() == {"status": "stopping"}
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            # Still serving new requests while balancers notice.
            assert client.post("/v1/chat/completions", json=chat | {"stream": False, "max_tokens": 2}).status_code == 200
            rest_chunks = [json.loads(line[6:]) for line in events if line.startswith("data: {")]
            for last in stream:
                grpc_tokens += last.token_ids
        assert rest_chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert last.finish_reason == "length" and len(grpc_tokens) == tokens
        assert gateway.wait(30) == 0
    finally:
        stack.stop()
    # The gateway closed its preprocessing pool (killed before its end, the pool's semaphores leaked).
    assert "leaked" not in (tmp_path / "stack.log").read_text()
