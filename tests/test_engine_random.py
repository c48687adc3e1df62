"""Randomized engine runs: whatever shares a step with it, each request gets the tokens it gets alone.

Each trial draws requests (shared text prefixes, one or two of a few images anywhere, a chat's next turn, greedy or
seeded sampling, penalties, log-probabilities, stop tokens), arrival steps, cancellations, a block size, a KV pool
small enough to preempt, a token budget that cuts prompts anywhere (down to one token), overlap on or off, and decode
steps through the CUDA-graph path or not. Every request that is not cancelled must end as it does alone in a roomy
engine (whose greedy outputs test_engine checks against transformers), no step may fail, and every block and table
row must come back. Seeded: a failure names its trial, which replays it."""
import random

import pytest
import torch

from services.llm_decoder.engine.llm_engine import LLMEngine
from services.llm_decoder.engine.sequence import SamplingParams, Sequence

TRIALS = 40
IMAGE_ROWS = 24


def engine(lm, num_blocks: int, block_size: int, max_batched_tokens: int, max_running: int, overlap: bool):
    return LLMEngine(lm, num_blocks=num_blocks, block_size=block_size, max_batched_tokens=max_batched_tokens,
                     max_running=max_running, device="cpu", dtype=torch.float32, overlap=overlap)


class Images(list):
    """A few images' embedding rows, and the token that stands for a row in a prompt."""
    token_id: int


@pytest.fixture(scope="module")
def images(cfg):
    g = torch.Generator().manual_seed(0)
    out = Images(torch.randn(IMAGE_ROWS, cfg.text.hidden_size, generator=g) * 0.5 for _ in range(3))
    out.token_id = cfg.image_token_id
    return out


def draw_request(rng: random.Random, images: Images) -> dict:
    ids = list(range(30, 30 + rng.randint(0, 40))) + [rng.randint(5, 500) for _ in range(rng.randint(1, 30))]
    placed = []  # (position, image index), an image's rows standing together
    if rng.random() < 0.5:
        for index in rng.choices(range(len(images)), k=rng.randint(1, 2)):
            at = rng.choice([p for p in range(len(ids) + 1) if not any(s < p < s + IMAGE_ROWS for s, _ in placed)])
            ids[at:at] = [images.token_id] * IMAGE_ROWS
            placed = [(p + IMAGE_ROWS * (p >= at), i) for p, i in placed] + [(at, index)]
    params = {"max_tokens": rng.randint(1, 12)}
    if rng.random() < 0.3:
        params |= {"temperature": 0.9, "seed": rng.randint(0, 99), "top_k": rng.choice([0, 5])}
    if rng.random() < 0.2:
        params["repetition_penalty"] = 1.2
    if rng.random() < 0.2:
        params["logprobs"] = 2
    if rng.random() < 0.2:
        params["stop_token_ids"] = frozenset(rng.sample(range(5, 1000), 100))
    return {"ids": ids, "images": [i for _, i in sorted(placed)], "params": params}


def sequence(key: str, request: dict, images: Images) -> Sequence:
    order = request["images"]
    return Sequence(key, request["ids"], SamplingParams(**request["params"]), image_token_id=images.token_id,
                    image_embeds=torch.cat([images[i] for i in order]) if order else None,
                    image_keys=[(f"image-{i}", IMAGE_ROWS) for i in order])


def alone(lm, images: Images, request: dict) -> Sequence:
    eng = engine(lm, 512, 16, 4096, 4, overlap=False)
    seq = sequence("alone", request, images)
    eng.scheduler.add(seq)
    while eng.has_work():
        eng.step()
    return seq


@pytest.mark.parametrize("trial", range(TRIALS))
def test_each_request_gets_what_it_gets_alone(lm, images, trial, monkeypatch):
    from services.llm_decoder.engine import llm_engine
    from tests.test_engine import record_eagerly

    record_eagerly(monkeypatch)
    failed = []  # steps the engine had to retry sequence by sequence
    monkeypatch.setattr(llm_engine.log, "exception", lambda *args: failed.append(args))
    rng = random.Random(trial)
    requests = [draw_request(rng, images) for _ in range(rng.randint(2, 10))]
    for i in range(1, len(requests)):  # some are a chat's next turn: an earlier prompt, its answer, a question
        first = requests[rng.randrange(i)]
        if rng.random() < 0.25 and "temperature" not in first["params"]:
            question = [rng.randint(5, 500) for _ in range(rng.randint(1, 9))]
            requests[i] |= {"ids": first["ids"] + alone(lm, images, first).output_ids + question,
                            "images": first["images"]}
    block_size = rng.choice([4, 8, 16])
    num_blocks = rng.choice([60, 512] if block_size < 16 else [25, 512])
    eng = engine(lm, num_blocks, block_size, max_batched_tokens=rng.choice([1, 2, 16, 50, 4096]),
                 max_running=rng.choice([2, 4, 16]), overlap=rng.random() < 0.5)
    if rng.random() < 0.5:  # decode steps through the graph path, as on CUDA
        eng.runner.capture(eng.scheduler.max_running)
    seqs = [sequence(str(i), r, images) for i, r in enumerate(requests)]
    arrivals = {}
    for seq in seqs:
        arrivals.setdefault(rng.randint(0, 8), []).append(seq)
    cancels = {rng.randint(0, 15): seq for seq in seqs if rng.random() < 0.2}

    step = 0
    while eng.has_work() or arrivals:
        for seq in arrivals.pop(step, []):
            eng.scheduler.add(seq)
        seq = cancels.get(step)
        if seq in eng.scheduler.running or seq in eng.scheduler.waiting:
            eng.scheduler.finish(seq, "abort")  # as the engine's loop does for a caller that went away
        eng.step()
        step += 1
        assert step < 2000, "no progress"

    for seq, request in zip(seqs, requests):
        if seq.finish_reason != "abort":
            want = alone(lm, images, request)
            assert (seq.output_ids, seq.finish_reason) == (want.output_ids, want.finish_reason), (trial, seq.id)
            assert seq.cached_tokens < seq.num_prompt  # its usage's cached prompt tokens (the last is always computed)
            for (got, top), (expected, expected_top) in zip(seq.logprobs, want.logprobs, strict=True):
                assert [t for t, _ in top] == [t for t, _ in expected_top]  # float sums differ with the batch
                assert got == pytest.approx(expected, abs=1e-4) and \
                    [v for _, v in top] == pytest.approx([v for _, v in expected_top], abs=1e-4)
    assert not failed
    assert len(eng.blocks.free) == num_blocks and sorted(eng.blocks.free_rows) == list(range(eng.scheduler.max_running))
