"""Optional API keys: without the right `Authorization: Bearer` a client gets an OpenAI-style 401 (gRPC:
UNAUTHENTICATED) and no work is done; probes and metrics stay open."""
import uuid

import grpc
import httpx
import openai
import pytest

from internvl.serving.v1 import serving_pb2 as pb
from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from services.gateway.auth import ApiKeys, read_api_keys
from services.gateway.errors import ApiError
from tools.run_local import start_stack


def test_keys_are_checked_by_digest():
    keys = ApiKeys(["k1", "k2"])
    keys.check("Bearer k2")
    keys.check("bearer  k1")
    for bad in (None, "", "Bearer", "Bearer k3", "Basic k1", "k1"):
        with pytest.raises(ApiError) as e:
            keys.check(bad)
        assert e.value.status == 401 and e.value.code == "invalid_api_key"
    ApiKeys([]).check(None)  # no keys: open
    assert b"k1" not in b"".join(keys.digests)


def test_keys_from_the_setting_and_a_file(tmp_path):
    (tmp_path / "keys").write_text("# the team's keys\nfile-key\n\n  other  \n")
    assert read_api_keys(" a, b ,", str(tmp_path / "keys")) == ["a", "b", "file-key", "other"]


@pytest.fixture(scope="module")
def locked(tiny_checkpoint, redis_url, tmp_path_factory):
    with open(tmp_path_factory.mktemp("locked") / "stack.log", "w") as log:
        stack = start_stack(str(tiny_checkpoint), redis_url=redis_url, log=log,
                            extra_env={"CACHE_NAMESPACE": f"locked-{uuid.uuid4().hex}", "API_KEYS": "sk-test-1"})
        yield stack
        stack.stop()


def test_rest_needs_a_key(locked):
    ask = dict(model="tiny-internvl2_5", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=locked.gateway_url + "/v1", api_key="wrong", max_retries=0).chat.completions.create(**ask)
    assert e.value.body["code"] == "invalid_api_key"
    assert httpx.get(locked.gateway_url + "/v1/models").status_code == 401
    client = openai.OpenAI(base_url=locked.gateway_url + "/v1", api_key="sk-test-1", max_retries=0)
    assert client.chat.completions.create(**ask).usage.completion_tokens == 2
    assert httpx.get(locked.gateway_url + "/health").status_code == 200
    assert httpx.get(locked.gateway_url + "/metrics").status_code == 200


def test_grpc_needs_a_key(locked):
    with grpc.insecure_channel(locked.gateway_grpc) as channel:
        gateway = pb_grpc.GatewayStub(channel)
        request = pb.ChatRequest(model="tiny-internvl2_5", max_tokens=2,
                                 messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(text="Hi")])])
        for call in (lambda **kw: gateway.Chat(request, **kw), lambda **kw: gateway.ListModels(pb.InfoRequest(), **kw)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = gateway.Chat(request, metadata=[("authorization", "Bearer sk-test-1")])
        assert answer.usage.completion_tokens == 2
