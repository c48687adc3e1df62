"""The batched sampler: greedy/sampled mixes, batch-independent seeded draws, the distribution, filters, penalties,
log-probabilities."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from services.llm_decoder.engine.sampler import (MIN_TEMPERATURE, PenaltyHistory, SamplingBatch, _apply_penalties,
                                                 logit_bias_of, sample, sample_to_host, uniform_noise)
from services.llm_decoder.engine.sequence import SamplingParams, Sequence

M64 = (1 << 64) - 1


def draw(logits, params, steps=None, histories=None):
    steps = steps if steps is not None else [0] * len(params)
    batch = SamplingBatch.build(params, steps, histories, logits.shape[-1], logits.device)
    out = sample(logits, batch)
    assert out.dtype == torch.int64 and out.shape == (len(params),) and out.device == logits.device
    return out.tolist()


def history(prompt: list[int], output: list[int]) -> PenaltyHistory:
    counts = {}
    for t in output:
        counts[t] = counts.get(t, 0) + 1
    return PenaltyHistory(torch.tensor(sorted(set(prompt)), dtype=torch.int64), counts, len(output))


def rand_logits(b, v, seed=0):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def hot(p, **kw):
    return SamplingParams(8, temperature=1.0, seed=p, **kw)


def test_hash_matches_reference_splitmix64():
    """The int64 torch hash equals the same arithmetic on Python's unbounded ints masked to 64 bits."""
    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)
    g = 0x9E3779B97F4A7C15
    for seed, step in [(0, 0), (1, 5), ((1 << 63) + 12345, 999), (-7 & M64, 3)]:
        signed = seed - (1 << 64) if seed >> 63 else seed
        u = uniform_noise(torch.tensor([signed]), torch.tensor([step]), 4)[0].tolist()
        row = mix((mix(seed) + step * g) & M64)
        want = [((mix((row + j * g) & M64) >> 41) * 2 + 1) / 2 ** 24 for j in range(1, 5)]
        assert u == want


def test_greedy_rows_are_argmax():
    logits = rand_logits(5, 50)
    params = [SamplingParams(8), SamplingParams(8, temperature=MIN_TEMPERATURE / 2, seed=3)] * 2 + [SamplingParams(8)]
    assert draw(logits, params) == logits.argmax(-1).tolist()


def test_mixed_greedy_and_sampled_batch():
    logits = torch.zeros(6, 1000)  # flat: sampled rows almost surely miss the argmax (index 0)
    params = [SamplingParams(8) if i % 2 == 0 else hot(i) for i in range(6)]
    out = draw(logits, params)
    assert out[0::2] == [0, 0, 0]
    assert all(t != 0 for t in out[1::2]) and len(set(out[1::2])) == 3
    alone = [draw(logits[i:i + 1], [params[i]])[0] for i in (1, 3, 5)]
    assert alone == out[1::2]


def test_same_seed_and_step_whatever_the_batch():
    v = 300
    base = rand_logits(1, v)[0] / 3  # moderately peaked, so the draw is really random
    params = [hot(s, top_p=0.95) for s in (11, 22, 33)]
    steps = [4, 9, 4]
    ref = draw(base.expand(3, v).clone(), params, steps)
    # Permuted and padded with other rows (greedy, other seeds, other filters).
    pad = [SamplingParams(8), hot(99, top_k=5), hot(11, min_p=0.2)]
    order = [4, 2, 0, 5, 1, 3]
    all_params, all_steps = params + pad, steps + [0, 1, 2]
    out = draw(base.expand(6, v).clone(), [all_params[i] for i in order], [all_steps[i] for i in order])
    assert [out[order.index(i)] for i in range(3)] == ref
    assert ref == draw(base.expand(3, v).clone(), params, steps)  # and reproducible


def test_different_seeds_and_steps_differ():
    logits = torch.zeros(64, 1000)
    assert len(set(draw(logits, [hot(s) for s in range(64)]))) > 55
    assert len(set(draw(logits, [hot(7)] * 64, list(range(64))))) > 55


def frequencies(logits_row, params, n=20000, seed=0):
    """Token frequencies of n draws: one seed, steps 0..n-1."""
    p = SamplingParams(8, seed=seed, **params)
    out = torch.tensor(draw(logits_row.expand(n, -1).clone(), [p] * n, list(range(n))))
    return torch.bincount(out, minlength=logits_row.numel()).float() / n


def chi2(freq, probs, n=20000):
    keep = probs > 0
    assert (freq[~keep] == 0).all(), "a filtered-out token was drawn"
    return float(((freq[keep] - probs[keep]) ** 2 / probs[keep]).sum() * n)


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


@pytest.mark.parametrize("seed", [0, 1])
def test_distribution_matches_softmax(seed):
    probs = (LOGITS / 0.7).softmax(-1)
    stat = chi2(frequencies(LOGITS, {"temperature": 0.7}, seed=seed), probs)
    assert stat < 25, stat  # df=5: p(chi2 > 25) ~ 1e-4
    # And it is not a near-miss that a biased sampler would also pass: greedy or uniform fail hard.
    assert chi2(torch.eye(6)[0], probs) > 1000 and chi2(torch.full((6,), 1 / 6), probs) > 1000


def test_distribution_with_filters():
    p = LOGITS.softmax(-1)  # [.57, .21, .13, .08, .03, .00]
    top_k = torch.tensor([p[0], p[1], p[2], 0, 0, 0]) / p[:3].sum()
    assert chi2(frequencies(LOGITS, {"temperature": 1.0, "top_k": 3}), top_k) < 25
    top_p = torch.tensor([p[0], p[1], 0, 0, 0, 0]) / p[:2].sum()  # .57 < .7 <= .78: two tokens reach it
    assert chi2(frequencies(LOGITS, {"temperature": 1.0, "top_p": 0.7}), top_p) < 25
    min_p = torch.where(p >= 0.2 * p[0], p, 0)
    assert chi2(frequencies(LOGITS, {"temperature": 1.0, "min_p": 0.2}), min_p / min_p.sum()) < 25


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = rand_logits(8, 500)
    greedy = logits.argmax(-1).tolist()
    assert draw(logits, [hot(s, top_k=1) for s in range(8)]) == greedy
    assert draw(logits, [hot(s, top_p=1e-6) for s in range(8)]) == greedy
    assert draw(logits, [hot(s, top_p=0.0) for s in range(8)]) == greedy
    assert draw(logits, [hot(s, top_k=-1) for s in range(8)]) != greedy  # -1 is off


def test_min_p_filters_low_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(400, 4).clone()
    out = draw(logits, [hot(s, min_p=0.4) for s in range(400)])  # keeps p >= 0.2: tokens 0 and 1
    assert set(out) == {0, 1}
    out = draw(logits, [hot(s) for s in range(400)])
    assert set(out) == {0, 1, 2, 3}


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.9, 0.1]])
    hist = [history([1, 1], [2, 3, 3])]  # prompt has 1; output has 2 once and 3 twice

    # Every penalized value, exactly: repetition on prompt-or-output tokens, presence/frequency on output counts.
    b = SamplingBatch.build([SamplingParams(8, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)],
                            [3], hist, 5, "cpu")
    want = [2.0, -1.0 * 2.0, 0.5 / 2.0 - 0.5 - 0.25, 1.9 / 2.0 - 0.5 - 0.5, 0.1]
    assert _apply_penalties(logits, b)[0].tolist() == pytest.approx(want)
    b = SamplingBatch.build([SamplingParams(8, presence_penalty=1.0)], [3], hist, 5, "cpu")
    assert _apply_penalties(logits, b)[0].tolist() == pytest.approx([2.0, -1.0, -0.5, 0.9, 0.1])  # prompt ignored
    b = SamplingBatch.build([SamplingParams(8, frequency_penalty=1.0)], [3], hist, 5, "cpu")
    assert _apply_penalties(logits, b)[0].tolist() == pytest.approx([2.0, -1.0, -0.5, -0.1, 0.1])
    # Greedy choice uses the penalized logits: a frequency penalty on the top token moves the argmax.
    logits2 = torch.tensor([[3.0, 2.9]])
    b = SamplingBatch.build([SamplingParams(8, frequency_penalty=0.1)], [2], [history([], [0, 0])], 2, "cpu")
    assert sample(logits2, b).tolist() == [1]
    # A row without penalties next to one with them is untouched.
    b = SamplingBatch.build([SamplingParams(8), SamplingParams(8, frequency_penalty=0.1)], [2, 2],
                            [history([], [0, 0]), history([], [0, 0])], 2, "cpu")
    assert sample(logits2.expand(2, 2).clone(), b).tolist() == [0, 1]
    assert SamplingParams(8, presence_penalty=0.1).uses_penalties and not SamplingParams(8).uses_penalties


def test_a_penalty_history_takes_only_the_new_tokens_and_a_pending_one_counts():
    """A sequence's history is updated with the tokens read back since the last step (the prompt's ids stay on the
    device, copied once); a row's token still on the device (overlap) counts as if it were in the history."""
    seq = Sequence("s", [4, 1, 4, 4], SamplingParams(8))
    first = PenaltyHistory.of(seq, "cpu")
    assert first.prompt.tolist() == [1, 4] and first.counts == {}
    seq.token_ids += [2, 3, 3]
    again = PenaltyHistory.of(seq, "cpu")
    assert again is first and again.prompt is first.prompt and again.counts == {2: 1, 3: 2}
    seq.token_ids += [2]
    assert PenaltyHistory.of(seq, "cpu").counts == {2: 2, 3: 2}
    params = [SamplingParams(8, repetition_penalty=1.5, frequency_penalty=0.5)] * 2
    logits = rand_logits(2, 6)
    whole = SamplingBatch.build(params, [3, 2], [history([1], [5, 5, 2]), history([0], [3, 2])], 6, "cpu")
    pending = SamplingBatch.build(params, [3, 2], [history([1], [5, 5]), history([0], [3])], 6, "cpu",
                                  pending=(torch.tensor([0, 1]), torch.tensor([2, 2])))
    assert torch.equal(_apply_penalties(logits, whole), _apply_penalties(logits, pending))


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("hist", [False, True])
def test_work_is_batched_and_stays_on_device(hist):
    """The op count is the same for 2 rows as for 64 (no per-row loop), and nothing is read back (no .item())."""
    def ops(b):
        params = [hot(i, top_k=20, top_p=0.9, min_p=0.01, frequency_penalty=0.1 * hist,
                      logit_bias=((i, 1.0), (i + 1, -1.0))) if i % 3 else SamplingParams(8) for i in range(b)]
        histories = [history([1, 2], [3, 3])] * b if hist else None
        batch, logits = SamplingBatch.build(params, list(range(b)), histories, 100, "cpu"), rand_logits(b, 100)
        with OpCounter() as counter:
            sample(logits, batch)
        return counter.ops
    small, large = ops(3), ops(64)
    assert small == large
    assert not any("local_scalar_dense" in op or "nonzero" in op for op in large), large


def test_logprobs_are_the_raw_distribution_for_the_rows_that_ask(monkeypatch):
    """Rows with logprobs get log_softmax of the raw logits (not tempered, not penalized) at the chosen token and
    their top alternatives, sorted; other rows get None; one device->host read for all of it."""
    logits = rand_logits(4, 300)
    params = [SamplingParams(8, logprobs=5),
              SamplingParams(8, temperature=0.5, seed=1, frequency_penalty=1.0, logprobs=0),
              SamplingParams(8), hot(2, top_k=3, logprobs=20, logit_bias=((5, 50.0),))]
    batch = SamplingBatch.build(params, [0, 1, 2, 3], [history([], [7, 7])] * 4, 300, "cpu")
    reads, tolist = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or tolist(t))
    ids, logprobs = sample_to_host(logits, batch)
    assert len(reads) == 1
    assert ids == sample(logits, batch).tolist()
    raw = logits.log_softmax(-1)
    assert logprobs[2] is None
    for row, count in ((0, 5), (1, 0), (3, 20)):
        chosen, top = logprobs[row]
        assert chosen == raw[row, ids[row]].item()
        want = raw[row].topk(count)
        assert [t for t, _ in top] == want.indices.tolist() and [v for _, v in top] == want.values.tolist()
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert logprobs[0][0] == logprobs[0][1][0][1]  # greedy: the chosen token is the most likely one
    assert ids[3] == 5  # the bias chose it; its log-probability above is the model's own


def test_logit_bias_is_added_to_the_logits_the_choice_is_made_from():
    """Greedy rows take the argmax of the biased logits (+100 forces a token, -100 bans one); a sampled row draws
    exactly what it draws from logits biased by hand, with the same seed; rows without a bias are untouched."""
    logits = rand_logits(4, 50)
    top = logits.argmax(-1).tolist()
    params = [SamplingParams(8, logit_bias=((7, 100.0),)), SamplingParams(8, logit_bias=((top[1], -100.0),)),
              None, SamplingParams(8)]
    by_hand = logits.clone()
    by_hand[0, 7] += 100
    by_hand[1, top[1]] -= 100
    by_hand[2, 11] += 3
    for seed in range(100):
        params[2] = hot(seed, logit_bias=((11, 3.0),))
        out = draw(logits, params, steps=[seed] * 4)
        assert out[:2] == [7, by_hand[1].argmax().item()] and out[3] == top[3]
        assert out[2] == draw(by_hand[2:3], [hot(seed)], steps=[seed])[0]
    assert [draw(logits[2:3], [hot(s, logit_bias=((11, 100.0),))])[0] for s in range(3)] == [11] * 3


def test_a_sequence_logit_bias_is_copied_to_the_device_once():
    """The engine's per-sequence bias tensors, made by the first step and reused, bias the batch exactly as the
    request's pairs do (rows with and without one, and min_tokens' ban on top)."""
    seqs = [Sequence("a", [1], SamplingParams(8, logit_bias=((7, 100.0), (3, -5.0)))), Sequence("b", [1], hot(1)),
            Sequence("c", [1], hot(2, logit_bias=((11, 2.5),), stop_token_ids=frozenset({4}), min_tokens=1))]
    first = [logit_bias_of(s, "cpu") for s in seqs]
    assert first[1] is None and [t.tolist() for t in first[0]] == [[7, 3], [100.0, -5.0]]
    again = [logit_bias_of(s, "cpu") for s in seqs]
    assert again[0] is first[0] and again[2] is first[2]
    params = [s.params for s in seqs]
    cached = SamplingBatch.build(params, [0] * 3, None, 20, "cpu", biases=again)
    fresh = SamplingBatch.build(params, [0] * 3, None, 20, "cpu")
    want = ([0, 0, 2, 2], [7, 3, 11, 4], [100.0, -5.0, 2.5, float("-inf")])
    assert [t.tolist() for t in cached.bias] == [t.tolist() for t in fresh.bias] == list(want)
    logits = rand_logits(3, 20)
    assert sample(logits, cached).tolist() == sample(logits, fresh).tolist()


def test_stop_tokens_wait_for_min_tokens():
    """Before its min_tokens-th token a row cannot choose a stop token, greedy or sampled, even one forced by a bias;
    from then on it can, and a row without min_tokens always could."""
    logits = rand_logits(3, 50)
    top = logits.argmax(-1).tolist()
    stops = frozenset({top[0], 3})
    params = [SamplingParams(8, stop_token_ids=stops, min_tokens=2),
              hot(5, stop_token_ids=frozenset({9}), logit_bias=((9, 100.0),), min_tokens=2),
              SamplingParams(8, stop_token_ids=frozenset({top[2]}))]
    for step in range(4):
        out = draw(logits, params, steps=[step] * 3)
        assert (out[0] == top[0], out[1] == 9) == ((step >= 2,) * 2) and out[0] != 3 and out[2] == top[2]
