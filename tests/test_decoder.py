"""The decoder's engine and servicer: token parity under batching and preemption, stops, aborts, validation."""
import grpc
import pytest
import torch

from internvl.serving.v1 import serving_pb2 as pb
from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from services.common.tensors import to_proto
from services.llm_decoder.engine.llm_engine import LLMEngine
from services.llm_decoder.engine.scheduler import Scheduler
from services.llm_decoder.engine.sequence import SamplingParams, Sequence


def run(lm, cfg, seqs, num_blocks=256, block_size=4, max_running=8, *, overlap):
    """Run sequences to completion; returns the engine (for its block manager) and each sequence's tokens."""
    engine = LLMEngine(lm, num_blocks=num_blocks, block_size=block_size, max_batched_tokens=4096,
                       max_running=max_running, device="cpu", dtype=torch.float32, overlap=overlap)
    for seq in seqs:
        engine.scheduler.add(seq)
    while engine.has_work():
        engine.step()
    return engine, [s.output_ids for s in seqs]


def prompts():
    return [list(range(10 + i, 30 + 3 * i)) for i in range(5)]


def test_batched_and_preempted_runs_equal_single_runs(lm, cfg, reference, monkeypatch, overlap):
    singles = []
    for ids in prompts():
        out = reference.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                       eos_token_id=None)
        singles.append(out[0, len(ids):].tolist())
    batched = run(lm, cfg, [Sequence(str(i), ids, SamplingParams(16)) for i, ids in enumerate(prompts())],
                  overlap=overlap)[1]
    assert batched == singles
    # 30 blocks of 4 tokens cannot hold all five sequences: the newest are preempted and recomputed.
    preempted = []
    original = Scheduler.preempt
    monkeypatch.setattr(Scheduler, "preempt", lambda self, seq: (preempted.append(seq.id), original(self, seq)))
    engine, squeezed = run(lm, cfg, [Sequence(str(i), ids, SamplingParams(16)) for i, ids in enumerate(prompts())],
                           num_blocks=30, overlap=overlap)
    assert squeezed == singles
    assert preempted and len(engine.blocks.free) == 30


def test_stop_token_ends_with_stop(lm, cfg, overlap):
    ids = prompts()[0]
    free_run = run(lm, cfg, [Sequence("a", ids, SamplingParams(12))], overlap=overlap)[1][0]
    stop = free_run[4]
    seq = Sequence("b", ids, SamplingParams(12, stop_token_ids=frozenset({stop})))
    run(lm, cfg, [seq], overlap=overlap)
    assert seq.output_ids == free_run[:free_run.index(stop) + 1] and seq.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(lm, cfg, overlap):
    def sampled(seed):
        seq = Sequence("s", prompts()[1], SamplingParams(16, temperature=1.0, top_p=0.9, seed=seed))
        return run(lm, cfg, [seq], overlap=overlap)[1][0]
    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)


def test_abort_frees_blocks(lm, cfg, overlap):
    engine = LLMEngine(lm, num_blocks=64, block_size=4, max_batched_tokens=4096, max_running=8,
                       device="cpu", dtype=torch.float32, overlap=overlap)
    seq = Sequence("x", prompts()[0], SamplingParams(100))
    engine.scheduler.add(seq)
    engine.step()
    engine.step()
    assert len(engine.blocks.free) < 64
    tokens = list(seq.token_ids)
    engine.scheduler.finish(seq, "abort")
    assert len(engine.blocks.free) == 64 and not engine.scheduler.has_work()
    # Overlapped, a step was still in flight: it is read back, its token dropped.
    assert engine.step() == [] and not engine.has_work() and seq.token_ids == tokens


@pytest.fixture(scope="module")
def decoder(stack):
    with grpc.insecure_channel(stack.decoder_addr) as channel:
        yield pb_grpc.LlmDecoderStub(channel)


def test_image_row_count_mismatch_is_invalid_argument(decoder, cfg):
    ids = [5, 6] + [cfg.image_token_id] * 256 + [7]
    rows = torch.zeros(255, cfg.text.hidden_size)
    with pytest.raises(grpc.RpcError) as e:
        list(decoder.Generate(pb.GenerateRequest(token_ids=ids, images=[pb.ImageEmbeddings(embeddings=to_proto(rows))],
                                                 sampling=pb.SamplingParams(max_tokens=2))))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "256 image-context tokens but 255 embedding rows" in e.value.details()


@pytest.mark.parametrize("request_fields,message", [
    ({"token_ids": []}, "empty"),
    ({"token_ids": [10 ** 6]}, "token ids must be in"),
    ({"token_ids": [1], "images": [pb.ImageEmbeddings(embeddings=pb.Tensor(dtype="float32", shape=[2, 64],
                                                                           data=b"123"))]}, "needs 512 bytes"),
    ({"token_ids": [1], "sampling": pb.SamplingParams(max_tokens=10 ** 6)}, "exceeds"),
    ({"token_ids": [1], "sampling": pb.SamplingParams(temperature=float("nan"))}, "finite"),
    ({"token_ids": [1], "sampling": pb.SamplingParams(temperature=float("inf"))}, "finite"),
    ({"token_ids": [1], "sampling": pb.SamplingParams(stop=["a", ""])}, "stop strings must not be empty"),
    ({"token_ids": [1], "sampling": pb.SamplingParams(logprobs=21)}, "logprobs must be in [0, 20]"),
    ({"token_ids": [1], "sampling": pb.SamplingParams(stop_token_ids=[2, 10 ** 6])}, "stop_token_ids must be in [0,"),
    ({"token_ids": [1], "sampling": pb.SamplingParams(logit_bias={2: 1.0, 10 ** 6: 1.0})}, "logit_bias token ids"),
    ({"token_ids": [1], "sampling": pb.SamplingParams(logit_bias={2: 100.5})}, "values must be in [-100, 100]"),
    ({"token_ids": [1], "sampling": pb.SamplingParams(logit_bias=dict.fromkeys(range(301), 1.0))}, "at most 300"),
    ({"token_ids": [1], "sampling": pb.SamplingParams(max_tokens=3, min_tokens=4)}, "min_tokens=4 must be in [0, 3]"),
    ({"token_ids": [1], "sampling": pb.SamplingParams(min_tokens=-1)}, "min_tokens=-1 must be in [0, "),
    ({"token_ids": [1], "sampling": pb.SamplingParams(logit_bias={2: float("nan")})}, "values must be in [-100, 100]"),
])
def test_invalid_generate_requests(decoder, request_fields, message):
    with pytest.raises(grpc.RpcError) as e:
        list(decoder.Generate(pb.GenerateRequest(**request_fields)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()


def test_generate_streams_tokens_and_usage(decoder):
    responses = list(decoder.Generate(pb.GenerateRequest(token_ids=[5, 6, 7], sampling=pb.SamplingParams(max_tokens=5))))
    # A message per step, or the tokens of several steps at once when the reader fell behind.
    assert sum(len(r.token_ids) for r in responses) == 5 and all(r.token_ids for r in responses)
    assert responses[-1].finish_reason == "length" and not any(r.finish_reason for r in responses[:-1])
    assert (responses[-1].usage.prompt_tokens, responses[-1].usage.completion_tokens) == (3, 5)


def test_a_final_only_call_gets_the_whole_answer_in_one_message(decoder, stack):
    """What a non-streamed answer asks for: one message with every token and the text the stream adds up to."""
    from tests.test_end_to_end import metric

    def generate(final_only: bool) -> list[pb.GenerateResponse]:
        return list(decoder.Generate(pb.GenerateRequest(token_ids=[9, 8, 7, 6], final_only=final_only,
                                                        sampling=pb.SamplingParams(max_tokens=12)), timeout=30))

    streamed = generate(False)
    ttft_before = metric(stack.decoder_metrics_url, "vllm:time_to_first_token_seconds_count")
    [final] = generate(True)
    assert list(final.token_ids) == [t for r in streamed for t in r.token_ids] and len(final.token_ids) == 12
    assert final.text == "".join(r.text for r in streamed)
    assert (final.finish_reason, final.usage.completion_tokens) == ("length", 12)
    assert 0 < final.first_token_s < 30 and not any(r.first_token_s for r in streamed)
    assert metric(stack.decoder_metrics_url, "vllm:time_to_first_token_seconds_count") == ttft_before + 1


def test_cancelled_call_frees_the_engine(decoder, stack):
    import time
    from tests.test_end_to_end import metric

    call = decoder.Generate(pb.GenerateRequest(token_ids=[5, 6, 7], sampling=pb.SamplingParams(max_tokens=5000)))
    next(call)
    next(call)
    assert metric(stack.decoder_metrics_url, "decoder_running_requests") == 1
    call.cancel()
    deadline = time.monotonic() + 10
    while metric(stack.decoder_metrics_url, "decoder_running_requests") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(stack.decoder_metrics_url, "decoder_running_requests") == 0
    assert metric(stack.decoder_metrics_url, "decoder_requests_total", finish_reason="cancelled") >= 1
    after = list(decoder.Generate(pb.GenerateRequest(token_ids=[5, 6], sampling=pb.SamplingParams(max_tokens=3)),
                                  timeout=30))
    assert after[-1].finish_reason == "length"


def test_a_stop_string_ends_and_frees_the_sequence(decoder, stack):
    """The answer ends before the stop string with "stop", its usage counts the tokens up to the one that completed
    it, and the engine drops the sequence at once (it was allowed 5000 tokens)."""
    import time
    from tests.test_end_to_end import metric

    ask = dict(token_ids=[9, 8, 7, 6], sampling=pb.SamplingParams(max_tokens=12))
    free = list(decoder.Generate(pb.GenerateRequest(**ask), timeout=30))
    full = "".join(r.text for r in free)
    # Two letters from the second half of the answer (messages may carry several tokens: not one message's text).
    stop = next((full[i:i + 2] for i in range(len(full) // 2, len(full) - 1) if full[i:i + 2].isalnum()),
                full.strip()[-1:])
    assert stop
    stops_before = metric(stack.decoder_metrics_url, "decoder_requests_total", finish_reason="stop")
    computed_before = metric(stack.decoder_metrics_url, "decoder_computed_tokens_total")
    stopped = list(decoder.Generate(pb.GenerateRequest(token_ids=ask["token_ids"], sampling=pb.SamplingParams(
        max_tokens=5000, stop=[stop], logprobs=1)), timeout=30))
    tokens = [t for r in stopped for t in r.token_ids]
    assert "".join(r.text for r in stopped) == full[:full.index(stop)] and stopped[-1].finish_reason == "stop"
    assert tokens == [t for r in free for t in r.token_ids][:len(tokens)]
    assert stopped[-1].usage.completion_tokens == len(tokens) == sum(len(r.logprobs) for r in stopped) <= 12
    assert metric(stack.decoder_metrics_url, "decoder_requests_total", finish_reason="stop") == stops_before + 1
    deadline = time.monotonic() + 5
    while metric(stack.decoder_metrics_url, "vllm:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(stack.decoder_metrics_url, "vllm:num_requests_running") == 0
    # The prompt and the answer, and the few steps that ran before the stop string was seen: not 5000 tokens.
    assert metric(stack.decoder_metrics_url, "decoder_computed_tokens_total") - computed_before < 4 + len(tokens) + 50


def test_only_the_newest_sequence_yields_its_blocks():
    """A needs a block, none is free: C (newest) is preempted; B, which has room, keeps running."""
    from services.llm_decoder.engine.block_manager import BlockManager

    blocks = BlockManager(num_blocks=6, block_size=4, max_rows=8)
    scheduler = Scheduler(blocks, max_batched_tokens=4096, max_running=8)
    a, b, c = (Sequence(name, list(range(n)), SamplingParams(50)) for name, n in (("A", 8), ("B", 6), ("C", 8)))
    for seq in (a, b, c):
        scheduler.add(seq)
    batch = scheduler.schedule()
    for seq, n in batch:  # as the engine does after a step
        seq.num_cached += n
        seq.token_ids.append(1)
    assert [seq for seq, _ in scheduler.schedule()] == [a, b] and list(scheduler.waiting) == [c]


def test_kv_budget_counts_whole_blocks():
    import argparse

    from services.llm_decoder.__main__ import kv_blocks

    class Model:
        def kv_layers(self):
            return [argparse.Namespace(kv_heads=2, head_dim=16)]

    args = argparse.Namespace(kv_cache_tokens=100, block_size=16, device="cpu", gpu_memory_utilization=0.9)
    with pytest.raises(SystemExit, match="cannot hold one 100-token context"):
        kv_blocks(args, Model(), max_model_len=100, dtype=torch.float32)  # 6 blocks hold 96 tokens
    assert kv_blocks(args, Model(), max_model_len=96, dtype=torch.float32) == 6


def test_a_tiny_temperature_is_greedy(lm, cfg, overlap):
    greedy = run(lm, cfg, [Sequence("g", prompts()[2], SamplingParams(12))], overlap=overlap)[1][0]
    tiny = run(lm, cfg, [Sequence("t", prompts()[2], SamplingParams(12, temperature=1e-39, seed=0))],
               overlap=overlap)[1][0]
    assert tiny == greedy


def test_the_engine_survives_a_failing_step(lm, cfg, monkeypatch):
    """A step that raises ends the sequences it held with "error"; the loop goes on serving."""
    import threading

    events, done = [], threading.Event()

    def on_step(outputs):
        for seq, token, reason in outputs:
            events.append((seq.id, reason))
            if reason:
                done.set()

    engine = LLMEngine(lm, num_blocks=64, block_size=4, max_batched_tokens=4096, max_running=8,
                       device="cpu", dtype=torch.float32, on_step=on_step)
    original = engine.runner.launch
    monkeypatch.setattr(engine.runner, "launch", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    engine.start()
    engine.add(Sequence("bad", prompts()[0], SamplingParams(4)))
    assert done.wait(10) and events == [("bad", "error")]
    monkeypatch.setattr(engine.runner, "launch", original)
    done.clear()
    engine.add(Sequence("good", prompts()[1], SamplingParams(4)))
    assert done.wait(10) and events[-1] == ("good", "length")


def test_logprobs_equal_the_reference_log_softmax(lm, cfg, reference, overlap):
    """Greedy with logprobs: each token's log-probability and top 5 are transformers' log_softmax of its logits."""
    ids = prompts()[3]
    seq = Sequence("lp", ids, SamplingParams(10, logprobs=5))
    other = Sequence("plain", prompts()[4], SamplingParams(10))  # batched with a row that does not ask
    run(lm, cfg, [seq, other], overlap=overlap)
    assert len(seq.logprobs) == seq.num_output == 10 and other.logprobs == []
    with torch.no_grad():
        logits = reference.model(input_ids=torch.tensor([seq.token_ids[:-1]])).logits[0, len(ids) - 1:]
    want = logits.float().log_softmax(-1)
    for k, (token, (chosen, top)) in enumerate(zip(seq.output_ids, seq.logprobs)):
        assert chosen == pytest.approx(want[k, token].item(), abs=1e-4)
        assert [t for t, _ in top] == want[k].topk(5).indices.tolist()
        assert [v for _, v in top] == pytest.approx(want[k].topk(5).values.tolist(), abs=1e-4)
        assert top[0][0] == token


def test_the_servicer_over_an_overlapped_engine_answers_as_over_a_sync_one(lm, cfg, tiny_checkpoint):
    """The decoder as served on CUDA (steps overlapped), here on the CPU over real gRPC: concurrent streamed and
    final-only calls, stop strings, log-probabilities and a stop token give what the engine without overlap gives."""
    import asyncio

    from services.common.tokenizer import load_tokenizer
    from services.llm_decoder.server import LlmDecoderServicer

    tokenizer = load_tokenizer(tiny_checkpoint).backend_tokenizer
    free = run(lm, cfg, [Sequence("f", prompts()[2], SamplingParams(12))], overlap=False)[1][0]
    requests = [pb.GenerateRequest(token_ids=prompts()[i], final_only=i % 2 == 1,
                                   sampling=pb.SamplingParams(max_tokens=12, logprobs=2 if i == 0 else 0))
                for i in range(4)]
    requests.append(pb.GenerateRequest(token_ids=prompts()[2], sampling=pb.SamplingParams(
        max_tokens=12, stop_token_ids=[free[5]])))
    requests.append(pb.GenerateRequest(token_ids=prompts()[3], final_only=True, sampling=pb.SamplingParams(
        max_tokens=12, stop=[tokenizer.decode(run(lm, cfg, [Sequence("s", prompts()[3], SamplingParams(12))],
                                                  overlap=False)[1][0][4:6])])))

    async def answers(overlap: bool) -> list[tuple]:
        engine = LLMEngine(lm, num_blocks=256, block_size=4, max_batched_tokens=4096, max_running=8, device="cpu",
                           dtype=torch.float32, overlap=overlap)
        servicer = LlmDecoderServicer(engine, tokenizer, cfg.image_token_id, cfg.text.vocab_size,
                                      cfg.text.hidden_size, 4096, torch.float32, pb.ModelInfo(model="tiny"))
        engine.start()
        server = grpc.aio.server()
        pb_grpc.add_LlmDecoderServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.LlmDecoderStub(channel)

                async def call(request):
                    out = [r async for r in stub.Generate(request, timeout=60)]
                    return ([t for r in out for t in r.token_ids], "".join(r.text for r in out),
                            out[-1].finish_reason, out[-1].usage.completion_tokens,
                            [(lp.chosen.logprob, [t.token_id for t in lp.top]) for r in out for lp in r.logprobs])
                return await asyncio.gather(*map(call, requests))
        finally:
            await server.stop(None)

    sync_answers, overlapped = asyncio.run(answers(False)), asyncio.run(answers(True))
    # Log-probabilities to float precision: the steps' batches differ, and with them the sums' order.
    assert [a[:4] for a in overlapped] == [a[:4] for a in sync_answers]
    for a, b in zip(overlapped, sync_answers):
        assert [t for _, t in a[4]] == [t for _, t in b[4]]
        assert [x for x, _ in a[4]] == pytest.approx([x for x, _ in b[4]], abs=1e-5)
    assert sync_answers[4][0] == free[:6] and sync_answers[4][2] == "stop"
    assert sync_answers[5][2] == "stop" and len(sync_answers[5][0]) < 12
    assert len(sync_answers[0][4]) == 12 and all(a[2] == "length" for a in sync_answers[:4])
