"""Graceful shutdown of a pool: on SIGTERM it reports NOT_SERVING at once, keeps serving for SHUTDOWN_DELAY_S,
then takes no new calls and lets the streams in flight finish within SHUTDOWN_GRACE_S, and exits."""
import signal
import time
import uuid

import grpc
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
