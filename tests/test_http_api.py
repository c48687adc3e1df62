"""The REST app's own error handling, apart from the stack: a fault of the server's answers in the OpenAI error body;
an invalid request is explained by the field the client sent."""
import math
from types import SimpleNamespace

import httpx
import pytest
from pydantic import ValidationError

from services.gateway.admission import Admission
from services.gateway.auth import ApiKeys
from services.gateway.errors import invalid_request
from services.gateway.http_api import create_app
from services.gateway.schema import UNSUPPORTED, ChatCompletionRequest


async def test_an_unexpected_error_is_a_500_in_the_openai_error_body():
    async def prepare(*args, **kwargs):
        raise RuntimeError("a bug")

    chat = SimpleNamespace(admission=Admission(4), limits=SimpleNamespace(max_request_bytes=1 << 20),
                           api_keys=ApiKeys([]), prepare=prepare)
    transport = httpx.ASGITransport(create_app(chat), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        r = await client.post("/v1/chat/completions",
                              json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 500
    assert r.json() == {"error": {"message": "internal server error", "type": "internal_error", "param": None,
                                  "code": None}}


@pytest.mark.parametrize("body,content_type", [
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}', "application/x-www-form-urlencoded"),
    (b'[{"model": "m"}]', "application/json"), (b"", "application/json")])
async def test_a_body_that_is_no_json_object_says_what_is_expected(body, content_type):
    chat = SimpleNamespace(admission=Admission(4), limits=SimpleNamespace(max_request_bytes=1 << 20),
                           api_keys=ApiKeys([]))
    transport = httpx.ASGITransport(create_app(chat))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        r = await client.post("/v1/chat/completions", content=body, headers={"content-type": content_type})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == ("the request body must be a JSON object, sent with Content-Type: "
                                            "application/json")


def _error(body: dict) -> str:
    try:
        ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        return invalid_request(e.errors()).message
    raise AssertionError("accepted")


def _content(content) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize("body,message", [
    # The content's branch the client took is the one explained, named as the client wrote it.
    (_content([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]),
     "messages.0.content.0: Input tag 'input_audio' found using 'type' does not match any of the expected tags: "
     "'text', 'image_url', 'video_url'"),
    (_content([{"type": "image_url", "image_url": {"url": ""}}]),
     "messages.0.content.0.image_url.url: String should have at least 1 character"),
    (_content([{"type": "text"}]), "messages.0.content.0.text: Field required"),
    (_content(5), "messages.0.content: Input should be a string or a list of content parts"),
    # JSON as Python parses it admits NaN and Infinity.
    (_content("hi") | {"temperature": math.nan}, "temperature: Input should be a finite number"),
    (_content([{"type": "video_url", "video_url": {"url": "x", "bound": [0, math.inf]}}]),
     "messages.0.content.0.video_url.bound.1: Input should be a finite number"),
    # OpenAI's types, strictly: a string is no number, 1 no boolean.
    (_content([{"type": "video_url", "video_url": {"url": "x", "bound": ["0", 1]}}]),
     "messages.0.content.0.video_url.bound.0: Input should be a valid number"),
    (_content([{"type": "video_url", "video_url": {"url": "x", "bound": [0, 1, 2]}}]),
     "messages.0.content.0.video_url.bound: List should have at most 2 items after validation, not 3"),
    (_content("hi") | {"stream": 1}, "stream: Input should be a valid boolean"),
])
def test_invalid_requests_are_explained_by_the_field_the_client_sent(body, message):
    assert _error(body) == message


def test_null_parameters_are_their_defaults():
    """OpenAI's parameters are nullable and some clients send every one: null is the default, as if absent."""
    nulls = {name: None for name in [*ChatCompletionRequest.model_fields, *UNSUPPORTED] if name != "messages"}
    plain = ChatCompletionRequest.model_validate(_content("hi") | {"model": "m"})
    assert ChatCompletionRequest.model_validate(_content("hi") | nulls | {"model": "m"}) == plain
    assert _error(_content("hi") | {"model": None}) == "model: Field required"


async def test_a_body_in_many_chunks_reaches_the_app_whole():
    """The admission middleware gathers the body (checking its size) and hands the app exactly those bytes."""
    from services.gateway.admission import RestAdmission

    received = []

    async def app(scope, receive, send):
        received.append(await receive())

    parts = [bytes([i % 251]) * 16384 for i in range(1024)]  # 16 MiB in 16 KiB chunks
    messages = iter([{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)])

    async def receive():
        return next(messages)

    await RestAdmission(app, Admission(1), max_body_bytes=1 << 30)(
        {"type": "http", "path": "/v1/chat/completions"}, receive, None)
    assert received == [{"type": "http.request", "body": b"".join(parts), "more_body": False}]
