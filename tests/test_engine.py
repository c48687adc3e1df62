"""The engine against transformers on mixed batches: chunked prefill (also inside an image), arrivals while others
decode, preemption, prefix caching, seeded sampling independent of the batch, cancellation."""
import pytest
import torch

from services.llm_decoder.engine.llm_engine import LLMEngine
from services.llm_decoder.engine.scheduler import Scheduler
from services.llm_decoder.engine.sequence import SamplingParams, Sequence

NEW = 10


def engine(lm, num_blocks=512, block_size=16, max_batched_tokens=4096, max_running=16, *, overlap):
    return LLMEngine(lm, num_blocks=num_blocks, block_size=block_size, max_batched_tokens=max_batched_tokens,
                     max_running=max_running, device="cpu", dtype=torch.float32, overlap=overlap)


def image_prompt(cfg, seed: int, text_before: int = 7, rows: int = 256):
    """Token ids with `rows` image-context tokens, and random image rows the size of real embeddings."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 300, (text_before,), generator=g).tolist() + [cfg.image_token_id] * rows + [11, 12, 13]
    return ids, torch.randn(rows, cfg.text.hidden_size, generator=g) * 0.5


def greedy_reference(reference, cfg, ids, image=None, new=NEW):
    model = reference.model
    with torch.no_grad():
        embeds = model.get_input_embeddings()(torch.tensor([ids]))
        if image is not None:
            embeds[0, torch.tensor(ids) == cfg.image_token_id] = image
        tokens = []
        out = model.model.language_model(inputs_embeds=embeds, use_cache=True)
        for _ in range(new):
            logits = model.lm_head(out.last_hidden_state[:, -1])
            tokens.append(int(logits.argmax(-1)))
            out = model.model.language_model(inputs_embeds=model.get_input_embeddings()(torch.tensor([[tokens[-1]]])),
                                       past_key_values=out.past_key_values, use_cache=True)
    return tokens


def run(eng, seqs, arrivals=None):
    """Step to completion; arrivals maps a step number to sequences added before that step."""
    arrivals = dict(arrivals or {})
    for seq in seqs:
        eng.scheduler.add(seq)
    step = 0
    while eng.has_work() or arrivals:
        for seq in arrivals.pop(step, []):
            eng.scheduler.add(seq)
        eng.step()
        step += 1
    return step


def test_mixed_batch_with_chunked_prefill_inside_images_equals_transformers(lm, cfg, reference, monkeypatch, overlap):
    """Text and image prompts of different lengths, some arriving while others decode, a token budget of 100 that
    cuts every image prompt into chunks with boundaries inside the image, and a KV pool small enough to preempt."""
    prompts = [(list(range(20 + i, 40 + 7 * i)), None) for i in range(3)] + [image_prompt(cfg, s) for s in (1, 2)]
    want = [greedy_reference(reference, cfg, ids, img) for ids, img in prompts]
    preempted = []
    original = Scheduler.preempt
    monkeypatch.setattr(Scheduler, "preempt", lambda self, seq: (preempted.append(len(self.blocks.blocks)),
                                                                 original(self, seq)))
    for num_blocks, max_batched in [(512, 4096), (512, 100), (40, 100)]:
        eng = engine(lm, overlap=overlap, num_blocks=num_blocks, block_size=8, max_batched_tokens=max_batched)
        seqs = [Sequence(str(i), ids, SamplingParams(NEW), image_embeds=img, image_token_id=cfg.image_token_id)
                for i, (ids, img) in enumerate(prompts)]
        run(eng, seqs[:2], arrivals={3: seqs[2:4], 6: seqs[4:]})
        assert [s.output_ids for s in seqs] == want, (num_blocks, max_batched)
        assert all(s.finish_reason == "length" for s in seqs)
        assert all(s.cached_tokens == 0 for s in seqs)  # no prompt shares a prefix: a preempted sequence taking back
                                                        # its own blocks reused nothing (its usage's cached tokens)
        assert len(eng.blocks.free) == num_blocks  # every block came back
    assert set(preempted) == {40}  # only the small pool preempted


def test_decodes_keep_flowing_while_a_long_prompt_is_prefilled(lm, cfg, overlap):
    eng = engine(lm, overlap=overlap, max_batched_tokens=64)
    short = Sequence("s", list(range(5, 25)), SamplingParams(40))
    eng.scheduler.add(short)
    eng.step()
    long_ids, img = image_prompt(cfg, 3, rows=512)
    eng.scheduler.add(Sequence("l", long_ids, SamplingParams(4), image_embeds=img, image_token_id=cfg.image_token_id))
    produced = 0
    for _ in range(len(long_ids) // 64):  # the long prompt takes ~9 steps; the short stream gets a token in each
        produced += sum(1 for seq, _, _ in eng.step() if seq is short)
    assert produced == len(long_ids) // 64


def test_prefix_cache_reuses_blocks_and_gives_identical_tokens(lm, cfg, overlap):
    system = list(range(30, 90))  # 60 tokens: 3 full blocks of 16
    eng = engine(lm, overlap=overlap)
    first = Sequence("a", system + [5, 6, 7], SamplingParams(NEW))
    run(eng, [first])
    computed = eng.computed_tokens
    second = Sequence("b", system + [5, 6, 7], SamplingParams(NEW))
    run(eng, [second])
    assert second.output_ids == first.output_ids
    assert eng.scheduler.cached_tokens == 48  # the 3 full blocks before the prompt's last token
    assert eng.computed_tokens - computed == (63 - 48) + (NEW - 1)  # the rest of the prompt, then one per step
    # A second turn: the first turn's prompt and answer are its prefix (4 full blocks computed by then).
    turn2 = Sequence("c", first.token_ids + [8, 9], SamplingParams(NEW))
    run(eng, [turn2])
    assert eng.scheduler.cached_tokens == 48 + 64
    fresh = Sequence("c", first.token_ids + [8, 9], SamplingParams(NEW))
    run(engine(lm, overlap=overlap), [fresh])
    assert turn2.output_ids == fresh.output_ids


def test_images_share_blocks_only_with_the_same_image(lm, cfg, overlap):
    ids, img = image_prompt(cfg, 4)
    _, other = image_prompt(cfg, 5)
    eng = engine(lm, overlap=overlap)

    def ask(rows, key):
        seq = Sequence(key, ids, SamplingParams(NEW), image_embeds=rows, image_token_id=cfg.image_token_id,
                       image_keys=[(key, rows.shape[0])])
        run(eng, [seq])
        return seq.output_ids

    a = ask(img, "img-a")
    hits = eng.scheduler.cached_tokens
    b = ask(other, "img-b")  # same token ids, another image: nothing past the text before it may be reused
    assert eng.scheduler.cached_tokens == hits and b != a
    assert ask(img, "img-a") == a and eng.scheduler.cached_tokens - hits >= 256


def test_questions_about_one_image_arriving_together_compute_it_once(lm, cfg, reference, overlap):
    """The gateway encodes an image once and sends every question about it at the same moment: the first prefills
    the image, the others wait that step and take its blocks. A prompt sharing only a little (the text before
    another image) and an unrelated one behind them start at once."""
    ids, img = image_prompt(cfg, 6)
    questions = [ids[:-3] + q for q in ([11, 12, 13], [21, 22, 23], [31, 32, 33])]
    other_ids, other_img = image_prompt(cfg, 7)
    other_ids[:7] = ids[:7]  # the same text before a different image: not worth waiting for
    prompts = [(q, img, "a") for q in questions] + [(other_ids, other_img, "b"), (list(range(40, 70)), None, None)]
    want = [greedy_reference(reference, cfg, q, rows) for q, rows, _ in prompts]
    eng = engine(lm, overlap=overlap)
    seqs = [Sequence(str(i), q, SamplingParams(NEW), image_embeds=rows, image_token_id=cfg.image_token_id,
                     image_keys=[(key, rows.shape[0])] if key else []) for i, (q, rows, key) in enumerate(prompts)]
    for seq in seqs:
        eng.scheduler.add(seq)
    eng.step()
    assert [s.status.name for s in seqs] == ["RUNNING", "WAITING", "WAITING", "RUNNING", "RUNNING"]
    run(eng, [])
    assert [s.output_ids for s in seqs] == want
    # The two that waited took every full block before the image's end from the first: 263 tokens, 16 blocks.
    assert [s.cached_tokens for s in seqs] == [0, 256, 256, 0, 0]
    total = sum(len(q) for q, _, _ in prompts)
    assert eng.computed_tokens == total - 2 * 256 + len(seqs) * (NEW - 1)
    assert len(eng.blocks.free) == 512


def test_seeded_sampling_does_not_depend_on_the_batch(lm, cfg, overlap):
    params = SamplingParams(16, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    alone = Sequence("x", list(range(40, 60)), params)
    run(engine(lm, overlap=overlap), [alone])
    crowd = [Sequence(str(i), list(range(i, i + 30)), SamplingParams(16, temperature=0.7, seed=i)) for i in range(5)]
    again = Sequence("x", list(range(40, 60)), params)
    run(engine(lm, overlap=overlap), crowd[:2] + [again] + crowd[2:])
    assert again.output_ids == alone.output_ids
    other = Sequence("y", list(range(40, 60)), SamplingParams(16, temperature=1.0, top_p=0.9, top_k=50, seed=99))
    run(engine(lm, overlap=overlap), [other])
    assert other.output_ids != alone.output_ids


def test_cancelling_frees_blocks_at_once_but_keeps_shared_ones(lm, cfg, overlap):
    eng = engine(lm, overlap=overlap, num_blocks=64)
    shared = list(range(100, 148))  # 3 full blocks
    a = Sequence("a", shared + [1], SamplingParams(100))
    eng.scheduler.add(a)
    eng.step()
    eng.step()
    b = Sequence("b", shared + [2], SamplingParams(100))
    eng.scheduler.add(b)
    eng.step()
    assert b.block_table[:3] == a.block_table[:3]  # b took a's prefix blocks
    eng.scheduler.finish(a, "abort")
    assert all(eng.blocks.blocks[i].ref == 1 for i in b.block_table)  # b's blocks stay
    eng.scheduler.finish(b, "abort")
    assert len(eng.blocks.free) == 64 and all(blk.ref == 0 for blk in eng.blocks.blocks)


def test_overlap_queues_each_step_before_reading_back_the_one_before(lm, cfg, monkeypatch):
    """The point of overlap: the host reads step k's tokens (and schedules, streams) only after step k + 1 is queued,
    so on CUDA the device never waits for it. Decode inputs then come from the device, never from the host."""
    from services.llm_decoder.engine.model_runner import ModelRunner

    calls, real_launch, real_finish = [], ModelRunner.launch, ModelRunner.finish
    monkeypatch.setattr(ModelRunner, "launch", lambda self, batch, prev=None: (
        calls.append("launch"), real_launch(self, batch, prev))[1])
    monkeypatch.setattr(ModelRunner, "finish",
                        staticmethod(lambda step: (calls.append("finish"), real_finish(step))[1]))
    seqs = [Sequence(str(i), list(range(20 + i, 40 + i)), SamplingParams(6)) for i in range(3)]
    run(engine(lm, overlap=True), seqs)
    assert calls[:5] == ["launch", "launch", "finish", "launch", "finish"]
    assert calls.count("launch") == calls.count("finish") == 6  # no step past the last token (max_tokens)
    assert all(len(s.output_ids) == 6 and s.num_pending == 0 for s in seqs)


def test_overlap_equals_sync_with_stops_penalties_logprobs_and_seeds(lm, cfg):
    """A stop token read back while the next step runs drops that step's token; penalties count the token of the
    step before while it is still on the device (two tokens biased alike take turns under a frequency penalty, as
    each one's count, the last one's included, sets it back); log-probabilities and seeded draws arrive with their
    tokens."""
    free = Sequence("f", list(range(50, 70)), SamplingParams(12))
    run(engine(lm, overlap=False), [free])
    stop = free.output_ids[3]

    def batch():
        return [Sequence("stop", list(range(50, 70)), SamplingParams(12, stop_token_ids=frozenset({stop}))),
                Sequence("pen", list(range(30, 52)), SamplingParams(12, repetition_penalty=1.3,
                                                                     frequency_penalty=0.5)),
                Sequence("lp", list(range(60, 75)), SamplingParams(12, logprobs=3)),
                Sequence("seed", list(range(20, 41)), SamplingParams(12, temperature=0.8, top_p=0.9, seed=5)),
                Sequence("late", list(range(80, 90)), SamplingParams(9)),
                Sequence("turns", list(range(40, 55)), SamplingParams(12, frequency_penalty=2.0,
                                                                      logit_bias=((100, 50.0), (200, 50.0))))]

    results = []
    for overlap in (False, True):
        eng, seqs = engine(lm, overlap=overlap), batch()
        run(eng, seqs[:4], arrivals={3: seqs[4:]})
        results.append([(s.output_ids, s.finish_reason, s.logprobs) for s in seqs])
        assert len(eng.blocks.free) == len(eng.blocks.blocks) and all(s.num_pending == 0 for s in seqs)
    assert [r[:2] for r in results[0]] == [r[:2] for r in results[1]]
    for (got, top), (want, want_top) in zip(results[1][2][2], results[0][2][2], strict=True):
        # the steps' batches differ (overlap reads a stop back a step later): float sums differ with the batch
        assert [t for t, _ in top] == [t for t, _ in want_top] and got == pytest.approx(want, abs=1e-5)
    assert results[1][0][:2] == (free.output_ids[:4], "stop")
    assert set(results[1][5][0]) == {100, 200}
    assert len(results[1][2][2]) == 12


class EagerGraph:
    """Stands in for a CUDA graph on the CPU: replay reruns the recorded function into the same output tensor, so
    the static buffers, padding rows and the spare block of the graph path are exercised as on a GPU."""

    def __init__(self, forward, out):
        self.forward, self.out = forward, out

    def pool(self):
        return None

    def replay(self):
        self.out.copy_(self.forward())


def record_eagerly(monkeypatch) -> None:
    """ModelRunner.capture (which records through services.common.cuda_graphs) records EagerGraphs from now on."""
    from services.llm_decoder.engine import model_runner

    def record(forward, pool):
        out = forward()  # capture runs under inference_mode
        return EagerGraph(forward, out), out

    monkeypatch.setattr(model_runner, "record", record)


def test_decode_graph_path_equals_eager(lm, cfg, monkeypatch, overlap):
    from services.llm_decoder.engine.model_runner import ModelRunner

    record_eagerly(monkeypatch)
    prompts = [list(range(10 + i, 30 + 5 * i)) for i in range(11)]  # 11 streams: padded to the 16-row graph
    lengths = [6 + 3 * (i % 4) for i in range(len(prompts))]  # the batch shrinks as streams end: stale pad rows
    eager = [Sequence(str(i), ids, SamplingParams(n)) for i, (ids, n) in enumerate(zip(prompts, lengths))]
    run(engine(lm, overlap=overlap), eager)
    graphed_engine = engine(lm, overlap=overlap, num_blocks=40)  # freed blocks are soon handed out again
    graphed_engine.runner.capture(16)
    replays = []
    original = ModelRunner._replay
    monkeypatch.setattr(ModelRunner, "_replay", lambda self, b, *a: (replays.append(b), original(self, b, *a))[1])
    graphed = [Sequence(str(i), ids, SamplingParams(n)) for i, (ids, n) in enumerate(zip(prompts, lengths))]
    run(graphed_engine, graphed[:7], arrivals={2: graphed[7:9], 9: graphed[9:]})  # 9: into freed blocks
    assert [s.output_ids for s in graphed] == [s.output_ids for s in eager]
    assert 7 in replays and 9 in replays  # 7 rows ran in the 8-row graph, 9 in the 16-row one


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_one_token_chunks_of_an_image_take_its_rows(lm, cfg, reference, monkeypatch, graphs):
    """A step's budget may leave a prompt one token, on an image position: its row must be spliced in as in a longer
    chunk, and a step of one-token rows with image rows among them is no decode step for the CUDA graphs. With a budget
    of 2, the image prompt is prefilled a token a step beside a decoding stream."""
    record_eagerly(monkeypatch)
    text, (ids, image) = [5, 6, 7], image_prompt(cfg, 4, text_before=2, rows=32)
    eng = engine(lm, overlap=False, max_batched_tokens=2)
    if graphs:
        eng.runner.capture(16)
    seqs = [Sequence("text", text, SamplingParams(len(ids) + 4)),
            Sequence("image", ids, SamplingParams(NEW), image_embeds=image, image_token_id=cfg.image_token_id)]
    run(eng, seqs)
    assert seqs[1].output_ids == greedy_reference(reference, cfg, ids, image)
    assert seqs[0].output_ids == greedy_reference(reference, cfg, text, new=len(ids) + 4)


def test_a_sequence_that_breaks_the_step_fails_alone(lm, cfg, monkeypatch, overlap):
    """A step fails when one sequence is in it: that one ends with "error", the others go on with the tokens they
    would have had."""
    from services.llm_decoder.engine.model_runner import ModelRunner

    prompts = [list(range(10 + i, 30 + 2 * i)) for i in range(4)]
    clean = [Sequence(str(i), ids, SamplingParams(8)) for i, ids in enumerate(prompts)]
    run(engine(lm, overlap=overlap), clean)
    real = ModelRunner.launch

    def launch(self, batch, prev=None):
        if any(seq.id == "2" and seq.num_output + seq.num_pending >= 3 for seq, _ in batch):
            raise RuntimeError("this sequence breaks the step")
        return real(self, batch, prev)

    monkeypatch.setattr(ModelRunner, "launch", launch)
    seqs = [Sequence(str(i), ids, SamplingParams(8)) for i, ids in enumerate(prompts)]
    eng = engine(lm, overlap=overlap)
    run(eng, seqs)
    assert [s.finish_reason for s in seqs] == ["length", "length", "error", "length"]
    assert [s.output_ids for i, s in enumerate(seqs) if i != 2] == [s.output_ids for i, s in enumerate(clean) if i != 2]
    assert seqs[2].output_ids == clean[2].output_ids[:3]
    assert len(eng.blocks.free) == len(eng.blocks.blocks)


def test_a_poisoned_sequence_ends_with_an_error_and_its_batch_finishes(lm, cfg, overlap):
    """An image whose rows are NaN makes its sequence's logits NaN: that sequence ends with "error" (no token from
    NaN logits), the others of its batch get their clean tokens, and its freed KV blocks poison nobody later."""
    texts = [list(range(10 + i, 30 + 2 * i)) for i in range(3)]
    clean_img, nan_img = image_prompt(cfg, 6), image_prompt(cfg, 7)
    nan_img[1][:] = float("nan")

    def seqs(prompts):
        return [Sequence(f"t{i}", ids, SamplingParams(NEW)) for i, ids in enumerate(prompts)] + [
            Sequence(key, ids, SamplingParams(NEW), image_embeds=rows, image_token_id=cfg.image_token_id,
                     image_keys=[(key, rows.shape[0])]) for key, (ids, rows) in (("clean", clean_img),)]

    clean = seqs(texts)
    run(engine(lm, overlap=overlap), clean)
    later = [list(range(200 + i, 260 + 3 * i)) for i in range(3)]
    want_later = seqs(later)
    run(engine(lm, overlap=overlap), want_later)

    eng = engine(lm, overlap=overlap, num_blocks=64)  # few blocks: the later sequences reuse the poisoned one's
    poisoned = Sequence("nan", nan_img[0], SamplingParams(NEW), image_embeds=nan_img[1],
                        image_token_id=cfg.image_token_id, image_keys=[("nan", nan_img[1].shape[0])])
    batch = seqs(texts)
    run(eng, batch + [poisoned])
    assert poisoned.finish_reason == "error" and poisoned.output_ids == []
    assert [s.finish_reason for s in batch] == ["length"] * 4
    assert [s.output_ids for s in batch] == [s.output_ids for s in clean]
    assert len(eng.blocks.free) == len(eng.blocks.blocks)
    again = seqs(later)
    run(eng, again)
    assert [s.output_ids for s in again] == [s.output_ids for s in want_later]


@pytest.mark.parametrize("rows", [1, 7, 8, 16, 48, 49])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_linear_equals_f_linear_on_either_side_of_the_transposed_window(rows, bias):
    from services.common.layers import linear

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 3, 96, generator=g)[:, 1]  # a strided input, as a slice of a batch is
    w, b = torch.randn(200, 96, generator=g), torch.randn(200, generator=g) if bias else None
    got, want = linear(x, w, b), torch.nn.functional.linear(x, w, b)
    assert got.shape == want.shape and got.is_contiguous()
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("s_q,s_k", [(1, 40), (40, 40), (30, 40), (21, 40), (20, 40), (5, 40)])
def test_causal_attention_aligned_to_the_end_of_the_keys(s_q, s_k):
    """Queries padded to the keys' length (most keys new) or an explicit mask (most keys cached): either way each
    query sees the cached keys and the new ones up to its own, as softmax over the masked scores does."""
    from services.common.layers import attention

    g = torch.Generator().manual_seed(s_q)
    q, k, v = torch.randn(2, s_q, 4, 16, generator=g), torch.randn(2, s_k, 2, 16, generator=g), \
        torch.randn(2, s_k, 2, 16, generator=g)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, dim=2)) * 0.25
    visible = torch.ones(s_q, s_k, dtype=torch.bool).tril(diagonal=s_k - s_q)
    want = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~visible, float("-inf")).softmax(-1),
                        v.repeat_interleave(2, dim=2))
    got = attention(q, k, v, 0.25, causal=True)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)


def test_decoder_projections_and_head_take_the_cpu_linear(lm):
    from services.common.layers import Linear

    layer = lm.model.layers[0]
    assert all(isinstance(m, Linear) for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                              layer.mlp.gate_up_proj, layer.mlp.down_proj, lm.lm_head))


def test_vocabulary_rows_are_padded_to_64_and_sliced_off_the_logits(lm, cfg):
    """cuBLAS needs 16-byte aligned rows for its fast kernels: the head and embedding hold a multiple of 64 rows (the
    checkpoint's first, zeros after), and the logits are exactly the vocabulary wide."""
    vocab = cfg.text.vocab_size
    assert vocab % 64  # the tiny checkpoint's vocabulary is not aligned: the padding is exercised
    for weight in (lm.lm_head.weight, lm.model.embed_tokens.weight):
        assert weight.shape[0] == -(-vocab // 64) * 64 and not weight[vocab:].any()
    hidden = torch.randn(3, cfg.text.hidden_size)
    logits = lm.logits(hidden)
    assert logits.shape == (3, vocab)
    assert torch.allclose(logits, hidden @ lm.lm_head.weight[:vocab].t(), atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        lm.lm_head.load_shard(lm.lm_head.weight, torch.zeros(vocab + 64, cfg.text.hidden_size), "rows")


def test_warm_up_leaves_no_trace(lm, cfg, overlap):
    """The start-up warm-up (GPU) runs real steps of every kind, then leaves the engine as new: no sequence, no
    block held or cached, no counts; what it serves next is what a fresh engine serves."""
    ids = list(range(30, 75))
    fresh = Sequence("a", ids, SamplingParams(NEW))
    run(engine(lm, overlap=overlap), [fresh])
    eng = engine(lm, overlap=overlap)
    launched = []
    original = eng.runner.launch
    eng.runner.launch = lambda batch, prev=None: (launched.append(batch), original(batch, prev))[1]
    eng.warm_up(cfg.text.vocab_size)
    assert any(len(b) > 1 and any(n > 1 for _, n in b) for b in launched)  # a prompt beside decodes
    assert max(sum(n for _, n in b) for b in launched) == 512  # a step past AWQ's fused sizes
    assert not eng.has_work() and eng.computed_tokens == eng.scheduler.cached_tokens == 0
    assert len(eng.blocks.free) == len(eng.blocks.blocks) and not eng.blocks.cached
    assert all(b.hash is None and b.ref == 0 for b in eng.blocks.blocks)
    again = Sequence("a", ids, SamplingParams(NEW))
    run(eng, [again])
    assert again.output_ids == fresh.output_ids and eng.scheduler.cached_tokens == 0
