"""The REST app's own error handling, apart from the stack: a fault of the server's answers in the OpenAI error body."""
from types import SimpleNamespace

import httpx

from services.gateway.admission import Admission
from services.gateway.auth import ApiKeys
from services.gateway.http_api import create_app


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
