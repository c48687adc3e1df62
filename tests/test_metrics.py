"""Every series in README's metrics table is served by the services it names and moves under a small load (the table
is parsed: the test fails when the docs and the code drift apart)."""
import asyncio
import re
import urllib.request
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import data_url, noise_image
from tools.run_local import ROOT, start_stack

PREFIXES = {"decoder": "decoder_", "vision": "vision_", "gateway": "gateway_"}
# Series that a healthy load on a CPU does not move, and why.
STEADY = {
    "decoder_gpu_memory_bytes": "no GPU here", "vision_gpu_memory_bytes": "no GPU here",
    "embedding_cache_up": "Redis stays up (tests/test_faults.py moves it)",
    "embedding_cache_errors_total": "Redis stays up (tests/test_faults.py moves it)",
    "gateway_pool_endpoints": "the pools do not change", "gateway_pool_mismatch_total": "no other checkpoint",
}


def documented() -> dict[str, set[str]]:
    """service -> the series README's metrics table says it serves. A name with a service's prefix belongs to that
    service; others (e.g. embedding_cache_up) to every service of its row."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    out: dict[str, set[str]] = {s: set() for s in PREFIXES}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("service", "---"):
            continue
        services = [s.strip() for s in cells[0].split(",")]
        for name in re.findall(r"`([^`{}]+)(?:\{[^`]*\})?`", cells[1]):
            owners = [s for s in services if name.startswith(PREFIXES[s])] or services
            for s in owners:
                out[s].add(name)
    return out


def scrape(url: str) -> dict[str, float]:
    """Sample name -> value summed over labels; a histogram under its `_count`."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[s.name] = values.get(s.name, 0.0) + s.value
    return values


def value(sample: dict[str, float], name: str) -> float | None:
    return sample.get(name, sample.get(name + "_count"))


@pytest.fixture(scope="module")
def small(tiny_checkpoint, redis_url, tmp_path_factory):
    """Limits small enough that a handful of requests queue at the decoder and the vision pool."""
    with open(tmp_path_factory.mktemp("metrics") / "stack.log", "w") as log:
        stack = start_stack(str(tiny_checkpoint), redis_url=redis_url, log=log, extra_env={
            "CACHE_NAMESPACE": f"metrics-{uuid.uuid4().hex}", "MAX_RUNNING": "2", "VISION_MAX_BATCH_TILES": "2"})
        yield stack
        stack.stop()


async def test_every_documented_series_exists_and_moves(small):
    docs = documented()
    assert all(docs.values()) and len(set().union(*docs.values())) >= 30, docs  # the table was found and read
    urls = {"gateway": small.gateway_url + "/metrics", "vision": small.vision_metrics_url,
            "decoder": small.decoder_metrics_url}
    seen: dict[str, dict[str, list[float]]] = {s: {} for s in urls}

    def record():
        for service, url in urls.items():
            sample = scrape(url)
            for name in docs[service]:
                seen[service].setdefault(name, []).append(value(sample, name))

    record()

    def chat(i: int, stream: bool) -> dict:
        content = [{"type": "image_url", "image_url": {"url": data_url(noise_image(300, 200, seed=i % 10))}},
                   {"type": "text", "text": "What?"}] if i % 2 else f"Count to {i}."
        return {"model": "tiny-internvl2_5", "max_tokens": 24, "ignore_eos": True, "stream": stream, "max_num": 4,
                "messages": [{"role": "user", "content": content}]}

    async with httpx.AsyncClient(base_url=small.gateway_url, timeout=60) as client:
        async def one(i: int):
            r = await client.post("/v1/chat/completions", json=chat(i, stream=i % 3 == 0))
            assert r.status_code == 200, r.text

        load = asyncio.gather(*(one(i) for i in range(16)))  # the repeated images are cache hits
        for _ in range(400):  # scraped while it runs (bounded: ~20 s)
            if load.done():
                break
            await asyncio.to_thread(record)
            await asyncio.sleep(0.02)
        await asyncio.wait_for(load, 60)
        # A prompt seen before, once its blocks are cached: a prefix-cache hit whatever the load's timing (two
        # requests for one image, encoded once, reach the decoder together and may be prefilled side by side).
        await one(1)
    record()
    # A labelled series appears with its first child: checked once the load has run.
    missing = {s: sorted(n for n in names if seen[s][n][-1] is None) for s, names in docs.items()}
    assert not any(missing.values()), f"documented but not served: {missing}"
    still = {s: sorted(n for n, values in seen[s].items() if len(set(values)) < 2 and n not in STEADY)
             for s in seen}
    assert not any(still.values()), f"documented series that did not move under load: {still}"
