"""Faults under load on the real stack (two replicas of each pool, its own Redis): Redis killed and restarted, then
a vision and a decoder replica killed with SIGKILL. Every request ends in the answer it had before the fault (greedy)
or a clear 429/503; a stream that had started ends with an error event, never a silent cut; no 500, no hang. (First,
before any fault: a chat's turns about an image stay on one decoder.)"""
import asyncio
import base64
import io
import json
import signal
import time
import urllib.request
import uuid

import httpx
import pytest
from PIL import PngImagePlugin
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import noise_image
from tools.run_local import start_redis, start_stack

MODEL = "tiny-internvl2_5"
BASE_IMAGES = [noise_image(64 + 16 * i, 56 + 8 * i, seed=700 + i) for i in range(3)]


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("faults") / "stack.log"
    with open(log_path, "w") as log:
        try:
            s = start_stack(str(tiny_checkpoint), log=log, vision_replicas=2, decoder_replicas=2,
                            extra_env={"CACHE_NAMESPACE": f"faults-{uuid.uuid4().hex}", "EJECT_S": "30"})
        except Exception:
            print(log_path.read_text())
            raise
        s.log, s.log_path = log, log_path
        yield s
        s.stop()


def image_url(base: int, variant: str) -> str:
    """Base image `base` as a PNG whose bytes (so cache key) differ per `variant`, pixels the same: the same answer,
    but a cache miss that the vision pool must encode."""
    buf, info = io.BytesIO(), PngImagePlugin.PngInfo()
    info.add_text("variant", variant)
    BASE_IMAGES[base].save(buf, "PNG", pnginfo=info)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request(prompt: int, variant: str, stream: bool, max_tokens: int = 24) -> dict:
    """Prompt 0..2: a text; 3..5: an image (a fresh variant of base image prompt-3)."""
    content = f"Tell me about number {prompt}." if prompt < 3 else [
        {"type": "image_url", "image_url": {"url": image_url(prompt - 3, variant)}}, {"type": "text", "text": "What?"}]
    return {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "return_token_ids": True,
            "stream": stream, "max_num": 2, "messages": [{"role": "user", "content": content}]}


async def ask(client: httpx.AsyncClient, body: dict, started: asyncio.Event | None = None):
    """(status, token ids or None, how it ended: "done", "error" (an error event after the stream began) or "cut")."""
    if not body["stream"]:
        r = await client.post("/v1/chat/completions", json=body)
        if r.status_code == 200:
            return 200, r.json()["choices"][0]["token_ids"], "done"
        assert r.json()["error"]["message"], r.text
        return r.status_code, None, "done"
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None, "done"
        ids = []
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                return 200, ids, "done"
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return 200, None, "error"
                ids += [t for c in chunk["choices"] for t in c.get("token_ids") or []]
                if ids and started:
                    started.set()
        return 200, None, "cut"


def series(url: str, name: str, **labels) -> float:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def check(results, want: dict[int, list[int]], prompts: list[int]) -> None:
    """Each result is its prompt's answer, or a clear refusal; streams end with [DONE] or an error event."""
    for (status, ids, end), prompt in zip(results, prompts):
        assert end != "cut", "a stream was cut without an error event"
        assert status in (200, 429, 503), status
        if status == 200 and end == "done":
            assert ids == want[prompt], (prompt, ids, want[prompt])


async def references(client) -> dict[int, list[int]]:
    answers = await asyncio.gather(*(ask(client, request(p, "ref", stream=False)) for p in range(6)))
    assert all(status == 200 for status, _, _ in answers), answers
    return {p: ids for p, (_, ids, _) in enumerate(answers)}


async def test_a_chats_turns_about_an_image_stay_on_one_decoder(stack):
    """Before the faults: three turns of a chat about one image, through two decoder replicas, all go to one decoder
    (the image's affinity), which reads the image's rows from Redis once and then takes them from its recent
    images."""
    def by_source(source: str) -> list[float]:
        return [series(u, "decoder_image_embeddings_total", source=source) for u in stack.decoder_metrics_urls]

    before = {source: by_source(source) for source in ("cache", "local", "inline")}
    body = request(3, "turns", stream=False, max_tokens=4)
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=60) as client:
        for turn in range(3):
            status, ids, _ = await ask(client, body)
            assert status == 200 and len(ids) == 4
            body["messages"] += [{"role": "assistant", "content": "Noise."},
                                 {"role": "user", "content": f"And {turn}?"}]
    moved = {source: [a - b for a, b in zip(by_source(source), before[source])] for source in before}
    decoder = moved["cache"].index(1)
    assert moved == {"cache": [int(i == decoder) for i in range(2)], "local": [2 * (i == decoder) for i in range(2)],
                     "inline": [0, 0]}, moved


async def test_redis_killed_and_restarted_during_load(stack):
    gw = stack.gateway_url + "/metrics"
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=60) as client:
        want = await references(client)
        assert series(gw, "embedding_cache_up") == 1
        inline_before = sum(series(u, "decoder_image_embeddings_total", source="inline")
                            for u in stack.decoder_metrics_urls)
        prompts = [i % 6 for i in range(36)]
        load = [asyncio.create_task(ask(client, request(p, f"redis-{i}", stream=i % 3 == 0)))
                for i, p in enumerate(prompts)]
        await asyncio.sleep(0.3)
        redis = stack.procs["redis"]
        port = int(redis.args[redis.args.index("--port") + 1])
        redis.send_signal(signal.SIGKILL)
        redis.wait()
        results = await asyncio.wait_for(asyncio.gather(*load), 120)
        # Served without Redis: more requests, each with a new image (images by reference cannot work now).
        outage = [3 + i % 3 for i in range(6)]
        results += await asyncio.wait_for(asyncio.gather(*(
            ask(client, request(p, f"outage-{i}", stream=i % 2 == 0)) for i, p in enumerate(outage))), 60)
        check(results, want, prompts + outage)
        assert [s for s, _, _ in results[-6:]] == [200] * 6  # the outage costs nothing but the cache
        assert series(gw, "embedding_cache_up") == 0
        assert sum(series(u, "decoder_image_embeddings_total", source="inline")
                   for u in stack.decoder_metrics_urls) >= inline_before + 6  # the rows went inline

        stack.procs["redis"], _ = start_redis(stack.log, port=port)
        hits, deadline = series(gw, "gateway_image_cache_total", result="hit"), time.monotonic() + 30
        def by_key() -> float:  # images whose rows a decoder took by key: read from Redis, or its recent copy
            return sum(series(u, "decoder_image_embeddings_total", source=source)
                       for u in stack.decoder_metrics_urls for source in ("cache", "local"))

        cached = by_key()
        for _ in range(60):  # the circuit closes after its cool-down (5 s): an image asked twice is then a hit
            body = request(3, "after-restart", stream=False)
            assert (await ask(client, body))[1:] == (want[3], "done")
            if series(gw, "gateway_image_cache_total", result="hit") > hits:
                break
            assert time.monotonic() < deadline, "no cache hit after Redis came back"
            await asyncio.sleep(0.5)
        assert series(gw, "embedding_cache_up") == 1
        # By reference again: the decoder takes the rows by key (the request that saw the first hit may have been
        # prepared while the circuit was still open, so inline: ask once more).
        assert (await ask(client, request(3, "after-restart", stream=False)))[1:] == (want[3], "done")
        assert by_key() > cached


async def test_a_vision_and_a_decoder_replica_killed_during_load(stack):
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=60) as client:
        want = await references(client)
        prompts = [i % 6 for i in range(40)]
        started = asyncio.Event()
        # Long streams (seconds each), so that some are in the middle of their answer on the replica that dies: a
        # call cut before its first answer reached the gateway is retried on the other replica instead.
        long, generated = 400, series(stack.decoder_metrics_urls[1], "decoder_generated_tokens_total")
        served = series(stack.gateway_url + "/metrics", "gateway_requests_total", api="rest", status="200")
        load = [asyncio.create_task(ask(client, request(p, f"kill-{i}", stream=i % 2 == 0,
                                                        max_tokens=long if i % 2 == 0 else 24), started))
                for i, p in enumerate(prompts)]
        await asyncio.wait_for(started.wait(), 60)
        deadline = time.monotonic() + 30  # the kill must find streams well under way on the replica that dies
        while (running := series(stack.decoder_metrics_urls[1], "decoder_running_requests")) < 1 or \
                series(stack.decoder_metrics_urls[1], "decoder_generated_tokens_total") < generated + 200:
            assert time.monotonic() < deadline and not all(t.done() for t in load), "no stream reached replica 2"
            await asyncio.sleep(0.02)
        for name in ("vision_encoder.2", "llm_decoder.2"):
            stack.procs[name].send_signal(signal.SIGKILL)
            stack.procs[name].wait()
        results = await asyncio.wait_for(asyncio.gather(*load), 120)
        # A long stream's answer begins with the short one (greedy): compare what both have.
        for i, (status, ids, end) in enumerate(results):
            assert end != "cut", f"request {i}: a stream was cut without an error event"
            assert status in (200, 429, 503), (i, status)
            if status == 200 and end == "done":
                n = long if i % 2 == 0 else 24
                assert len(ids) == n and ids[:24] == want[prompts[i]], (i, ids)
        ends = [end for _, _, end in results]
        assert running >= 1 and ends.count("error") >= 1, (running, ends)  # streams on the dead replica: errors
        # A stream that ended with an error event is counted as that error, not as the 200 its headers said.
        assert series(stack.gateway_url + "/metrics", "gateway_requests_total", api="rest", status="200") - served == \
            sum(status == 200 and end == "done" for status, _, end in results)
        assert [s for s, _, _ in results].count(200) >= 30

        # Afterwards: the remaining replicas serve everything, fresh images included.
        vision = series(stack.vision_metrics_urls[0], "vision_encode_requests_total", status="ok")
        decoder = series(stack.decoder_metrics_urls[0], "decoder_requests_total")
        after = await asyncio.wait_for(asyncio.gather(*(
            ask(client, request(p, f"after-{i}", stream=i % 2 == 0)) for i, p in enumerate(range(6)))), 60)
        assert [(s, ids, end) for s, ids, end in after] == [(200, want[p], "done") for p in range(6)]
        assert series(stack.vision_metrics_urls[0], "vision_encode_requests_total", status="ok") >= vision + 3
        assert series(stack.decoder_metrics_urls[0], "decoder_requests_total") >= decoder + 6
