"""Load above the configured limits on the real stack (three services + Redis): a few hundred mixed requests (text,
images, repeated images, streams, clients that leave). Every request ends in a full answer or a clear 429/503 (no
500, no hang), greedy answers to the same prompt are identical, and the stack serves normally afterwards."""
import asyncio
import json
import random
import uuid

import httpx
import pytest

from tests.conftest import data_url, noise_image
from tools.run_local import start_stack

MODEL = "tiny-internvl2_5"
IMAGES = [data_url(noise_image(96 + 17 * i, 80 + 13 * i, seed=900 + i)) for i in range(4)]


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint, redis_url, tmp_path_factory):
    with open(tmp_path_factory.mktemp("load") / "stack.log", "w") as log:
        stack = start_stack(str(tiny_checkpoint), redis_url=redis_url, log=log, extra_env={
            "CACHE_NAMESPACE": f"load-{uuid.uuid4().hex}", "MAX_CONCURRENT_REQUESTS": "24", "MAX_WAITING": "8",
            "MAX_RUNNING": "16"})
        yield stack
        stack.stop()


def body(i: int) -> tuple[str, dict]:
    """Request i: (the prompt's identity, the request). A few prompts, so that answers can be compared."""
    kind = i % 4
    if kind == 0:
        prompt = f"text {i % 5}"
        content = f"Tell me about number {i % 5}."
    else:
        prompt = f"image {i % 4}"
        content = [{"type": "image_url", "image_url": {"url": IMAGES[i % 4]}}, {"type": "text", "text": "What?"}]
    return prompt, {"model": MODEL, "max_tokens": 8, "temperature": 0, "return_token_ids": True,
                    "messages": [{"role": "user", "content": content}], "max_num": 2}


async def one(client: httpx.AsyncClient, i: int, rng: random.Random):
    """As a well-behaved client: on a 429, wait a little (Retry-After says 1 s; jittered shorter here) and retry."""
    for _ in range(60):
        prompt, status, ids = await attempt(client, i)
        if status != 429:
            return prompt, status, ids
        await asyncio.sleep(rng.uniform(0.05, 0.3))
    return prompt, status, ids


async def attempt(client: httpx.AsyncClient, i: int):
    prompt, req = body(i)
    if i % 7 == 3:  # a client that leaves mid-stream
        async with client.stream("POST", "/v1/chat/completions", json=req | {"stream": True}) as r:
            if r.status_code == 200:
                async for _ in r.aiter_lines():
                    break
            return prompt, r.status_code, None
    if i % 5 == 1:  # streamed to the end
        async with client.stream("POST", "/v1/chat/completions", json=req | {"stream": True}) as r:
            if r.status_code != 200:
                await r.aread()
                return prompt, r.status_code, None
            ids = []
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    for choice in chunk["choices"]:
                        ids += choice.get("token_ids") or []
            return prompt, 200, ids
    r = await client.post("/v1/chat/completions", json=req)
    if r.status_code == 200:
        return prompt, 200, r.json()["choices"][0]["token_ids"]
    assert r.json()["error"]["message"], r.text
    return prompt, r.status_code, None


async def test_mixed_load_above_the_limits(loaded):
    rng = random.Random(0)
    limits = httpx.Limits(max_connections=300)
    async with httpx.AsyncClient(base_url=loaded.gateway_url, timeout=120, limits=limits) as client:
        first = await asyncio.gather(*(attempt(client, i) for i in range(60)))  # 60 at once: above the limits
        assert {status for _, status, _ in first} == {200, 429}
        results = await asyncio.wait_for(asyncio.gather(*(one(client, i, rng) for i in range(240))), timeout=240)
        statuses = [status for _, status, _ in results]
        assert set(statuses) <= {200, 503}, sorted(set(statuses))  # retried 429s end served (no 500, no hang)
        assert statuses.count(200) >= 230
        answers: dict[str, set] = {}
        for prompt, status, ids in results:
            if ids is not None:
                answers.setdefault(prompt, set()).add(tuple(ids))
        assert all(len(a) == 1 for a in answers.values()), {p: len(a) for p, a in answers.items()}
        # Afterwards: nothing is stuck, every request is served again.
        after = await asyncio.gather(*(client.post("/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "again"}]}) for _ in range(4)))
        assert [r.status_code for r in after] == [200] * 4
