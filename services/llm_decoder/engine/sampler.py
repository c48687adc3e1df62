"""Batched next-token choice on the logits' device: logit biases (and min_tokens' ban on stop tokens), penalties,
temperature, top-k, top-p, min-p, seeded draws, and the log-probabilities of the rows that ask for them.

The only device->host transfer is the packed tensor of `sample_for_host`: every decision that would need a value back
from the device (which rows are greedy, whether to sort, which rows want log-probabilities) is made on the host in
SamplingBatch.build, and host->device copies go through `to_device`, which never waits for the device.
"""
import math
import random
from dataclasses import dataclass, field

import torch

from services.llm_decoder.engine.sequence import SamplingParams, Sequence

# Below this a temperature is greedy: dividing by it would overflow float32 logits.
MIN_TEMPERATURE = 1e-5

_MASK64 = (1 << 64) - 1


def to_device(data: list, dtype: torch.dtype, device) -> torch.Tensor:
    """A small host list as a tensor on `device`, without waiting for the work queued there: on CUDA, a copy from
    pageable memory would wait for the stream (so an overlapped step's host work would wait for the step before it);
    from pinned memory it is queued like a kernel."""
    device = torch.device(device)
    return torch.tensor(data, dtype=dtype, pin_memory=device.type == "cuda").to(device, non_blocking=True)

# (the chosen token's log-probability, [(token id, log-probability), ...] of the most likely tokens, best first)
Logprobs = tuple[float, list[tuple[int, float]]]


def _i64(c: int) -> int:
    """A 64-bit pattern as the signed value torch's int64 holds."""
    c &= _MASK64
    return c - (1 << 64) if c >> 63 else c


_GOLDEN, _M1, _M2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; masking off the copied sign bits makes it the logical shift splitmix needs.
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer (a bijection on 64-bit words); int64 multiplication wraps like uint64."""
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """u in (0, 1), [n, vocab], a function of (seed, step, vocab index) only: batch composition cannot change it."""
    row = _mix(_mix(seeds) + steps * _GOLDEN)
    idx = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=seeds.device)
    bits = _shr(_mix(row[:, None] + idx * _GOLDEN), 41)  # top 23 bits, so 2 * bits + 1 is exact in float32
    return (bits * 2 + 1).float() * 2.0 ** -24           # odd multiples of 2^-24: never 0 or 1


@dataclass
class PenaltyHistory:
    """A sequence's tokens as the penalties see them, kept up to date as they come, so that a step's work is its new
    tokens, not the context: the prompt's distinct ids (copied to the device once) and each output id's count."""
    prompt: torch.Tensor                # int64, on the device
    counts: dict[int, int] = field(default_factory=dict)  # output id -> occurrences, of the tokens read back
    counted: int = 0                    # output tokens in `counts`

    @classmethod
    def of(cls, seq: Sequence, device) -> "PenaltyHistory":
        h = seq.penalty_history
        if h is None:
            h = seq.penalty_history = cls(to_device(sorted(set(seq.prompt_ids)), torch.int64, device))
        for t in seq.token_ids[seq.num_prompt + h.counted:]:
            h.counts[t] = h.counts.get(t, 0) + 1
        h.counted = seq.num_output
        return h


def logit_bias_of(seq: Sequence, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A sequence's logit_bias as device tensors (token ids, values), copied once: up to 300 pairs a row would
    otherwise be flattened and copied every step. None without one."""
    if seq.params.logit_bias and seq.bias_on_device is None:
        seq.bias_on_device = bias_tensors(seq.params.logit_bias, device)
    return seq.bias_on_device


def bias_tensors(logit_bias: tuple[tuple[int, float], ...], device) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not logit_bias:
        return None
    ids, values = zip(*logit_bias)
    return to_device(ids, torch.int64, device), to_device(values, torch.float32, device)


def _row_of_each(rows: list[int], sizes: list[int], device) -> torch.Tensor:
    """The row of each element of per-row device tensors of these sizes, concatenated in this order."""
    n = to_device([rows, sizes], torch.int64, device)
    return n[0].repeat_interleave(n[1], output_size=sum(sizes))


@dataclass
class SamplingBatch:
    """Per-row settings as device tensors [B], built once per step."""
    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor                 # int64; off (0 or -1) stored as vocab_size
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    seeds: torch.Tensor                 # int64
    steps: torch.Tensor                 # int64: index of the token being sampled
    token_counts: torch.Tensor | None = None   # float32 [B, V]: occurrences in the output
    prompt_mask: torch.Tensor | None = None    # bool [B, V]: occurs in the prompt
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows, token ids, values) added to logits
    # Host-side facts, so sample() branches without reading anything back from the device.
    sampled_rows: torch.Tensor | None = None   # int64 indices of non-greedy rows; None when every row samples
    any_sampled: bool = False
    use_sort: bool = False              # some sampled row uses top-k or top-p
    use_min_p: bool = False
    logprob_rows: list[tuple[int, int]] = field(default_factory=list)  # (row, alternatives) of rows that ask

    @classmethod
    def build(cls, params: list[SamplingParams], steps: list[int], histories: list[PenaltyHistory] | None,
              vocab_size: int, device, pending: tuple[torch.Tensor, torch.Tensor] | None = None,
              biases: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None) -> "SamplingBatch | None":
        """histories: each row's, or None when no row uses a penalty; pending: (rows, their last token ids) of rows
        whose last token is still on the device (not in their history yet); biases: each row's logit_bias on the
        device (`logit_bias_of`), else copied from params now. None when every row is plain greedy without
        log-probabilities: an argmax needs no per-row settings."""
        sampled = [i for i, p in enumerate(params) if p.temperature >= MIN_TEMPERATURE]
        if biases is None:
            biases = [bias_tensors(p.logit_bias, device) for p in params]
        biased = [(i, b) for i, b in enumerate(biases) if b is not None]
        banned = [(i, t) for i, (p, s) in enumerate(zip(params, steps)) if s < p.min_tokens for t in p.stop_token_ids]
        if not sampled and histories is None and not biased and not banned and \
                all(p.logprobs is None for p in params):
            return None
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        seeds = [_i64(p.seed if p.seed is not None else random.getrandbits(64)) for p in params]
        # Two host->device copies for all the per-row scalars.
        f = to_device([[p.temperature for p in params], [p.top_p for p in params], [p.min_p for p in params],
                       [p.repetition_penalty for p in params], [p.presence_penalty for p in params],
                       [p.frequency_penalty for p in params]], torch.float32, device)
        n = to_device([seeds, steps, top_k], torch.int64, device)
        batch = cls(temperature=f[0], top_p=f[1], min_p=f[2], repetition_penalty=f[3], presence_penalty=f[4],
                    frequency_penalty=f[5], seeds=n[0], steps=n[1], top_k=n[2],
                    sampled_rows=None if len(sampled) == len(params) else to_device(sampled, torch.int64, device),
                    any_sampled=bool(sampled),
                    use_sort=any(top_k[i] < vocab_size or params[i].top_p < 1 for i in sampled),
                    use_min_p=any(params[i].min_p > 0 for i in sampled),
                    logprob_rows=[(i, p.logprobs) for i, p in enumerate(params) if p.logprobs is not None])
        parts = []  # (rows, token ids, values) of the logit biases, then of min_tokens' ban on stop tokens
        if biased:
            parts.append((_row_of_each([i for i, _ in biased], [len(b[0]) for _, b in biased], device),
                          torch.cat([b[0] for _, b in biased]), torch.cat([b[1] for _, b in biased])))
        if banned:
            at = to_device([[i for i, _ in banned], [t for _, t in banned]], torch.int64, device)
            parts.append((at[0], at[1], torch.full((len(banned),), -math.inf, device=device)))
        if parts:
            batch.bias = tuple(torch.cat(part) for part in zip(*parts))
        if histories is not None:
            shape = (len(params), vocab_size)
            # (row, id, count) of every distinct output id: one copy, of as many values as the outputs' distinct ids
            counts = to_device([[i for i, h in enumerate(histories) for _ in h.counts],
                                [t for h in histories for t in h.counts],
                                [c for h in histories for c in h.counts.values()]], torch.int64, device)
            batch.token_counts = torch.zeros(shape, device=device).index_put_((counts[0], counts[1]), counts[2].float())
            if pending is not None:
                batch.token_counts.index_put_(pending, torch.ones(len(pending[0]), device=device), accumulate=True)
            # The prompts' ids are on the device already: only their lengths go there.
            rows = _row_of_each(list(range(len(histories))), [len(h.prompt) for h in histories], device)
            batch.prompt_mask = torch.zeros(shape, dtype=torch.bool, device=device).index_put_(
                (rows, torch.cat([h.prompt for h in histories])), torch.ones((), dtype=torch.bool, device=device))
        return batch


def _apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    counts = b.token_counts
    seen = b.prompt_mask | (counts > 0)
    rep = b.repetition_penalty[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - b.frequency_penalty[:, None] * counts - b.presence_penalty[:, None] * (counts > 0)


def sample(logits: torch.Tensor, batch: SamplingBatch | None) -> torch.Tensor:
    """logits [B, V] float32 -> int64 ids [B] on the logits' device; greedy rows are argmax of the biased and
    penalized logits."""
    if batch is None:
        return logits.argmax(dim=-1)
    if batch.bias is not None:  # out of place: the log-probabilities are of the raw logits
        logits = logits.index_put(batch.bias[:2], batch.bias[2], accumulate=True)
    if batch.token_counts is not None:
        logits = _apply_penalties(logits, batch)
    ids = logits.argmax(dim=-1)
    if not batch.any_sampled:
        return ids
    rows = batch.sampled_rows
    pick = (lambda t: t) if rows is None else (lambda t: t[rows])
    x = pick(logits) / pick(batch.temperature)[:, None]
    V = x.shape[-1]
    if batch.use_sort:
        sorted_x, order = x.sort(dim=-1, descending=True)
        pos = torch.arange(V, device=x.device)
        sorted_x.masked_fill_(pos >= pick(batch.top_k)[:, None], float("-inf"))
        p = sorted_x.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does.
        drop = (p.cumsum(dim=-1) - p >= pick(batch.top_p)[:, None]) & (pick(batch.top_p)[:, None] < 1) & (pos > 0)
        x = torch.empty_like(x).scatter_(-1, order, sorted_x.masked_fill_(drop, float("-inf")))
    if batch.use_min_p:
        p = x.softmax(dim=-1)
        x = x.masked_fill(p < pick(batch.min_p)[:, None] * p.amax(dim=-1, keepdim=True), float("-inf"))
    # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks i with probability p_i.
    noise = -uniform_noise(pick(batch.seeds), pick(batch.steps), V).log()
    chosen = (x.softmax(dim=-1) / noise).argmax(dim=-1)
    if rows is None:
        return chosen
    return ids.index_copy(0, rows, chosen)


def sample_for_host(logits: torch.Tensor, batch: SamplingBatch | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen ids [B] on the device, and everything the host reads of this step packed in one device tensor for
    `read_back` (the ids, -1 for a row whose logits are not finite, the log-probabilities asked for).

    Log-probabilities are the model's raw distribution, log_softmax of the logits before biases, penalties,
    temperature and filters (vLLM's default): what the model thinks of a token, whatever the request did to pick it.
    """
    ids = sample(logits, batch)
    # A row with a NaN or infinite logit (a poisoned sequence) has no next token: -1 ends that sequence alone,
    # read back with the others (no extra device sync). One pass: a row's sum is finite exactly when its logits are
    # (logits are far from float32's overflow), where isfinite().all() reads the row three times.
    poisoned = ids.masked_fill(~logits.sum(dim=-1, dtype=torch.float32).isfinite(), -1)
    if batch is None or not batch.logprob_rows:
        return ids, poisoned
    k = max(n for _, n in batch.logprob_rows)
    rows = to_device([i for i, _ in batch.logprob_rows], torch.int64, logits.device)
    logp = logits[rows].float().log_softmax(dim=-1)
    top = logp.topk(k, dim=-1)  # sorted, most likely first
    chosen = logp.gather(-1, ids[rows, None])
    # float64 holds the ids exactly and the float32 values unchanged: one device->host copy for all of it.
    return ids, torch.cat([poisoned.double(), chosen.double().flatten(), top.values.double().flatten(),
                           top.indices.double().flatten()])


def read_back(host: list, batch: SamplingBatch | None, b: int) -> tuple[list[int], list[Logprobs | None]]:
    """`sample_for_host`'s packed tensor, as a list on the host -> the ids of the B rows, and each row's Logprobs if
    it asked for them (else None)."""
    if batch is None or not batch.logprob_rows:
        return [int(x) for x in host], [None] * b
    r, k = len(batch.logprob_rows), max(n for _, n in batch.logprob_rows)
    values, indices = host[b + r:b + r + r * k], host[b + r + r * k:]
    out: list[Logprobs | None] = [None] * b
    for j, (i, n) in enumerate(batch.logprob_rows):
        out[i] = (host[b + j], [(int(indices[j * k + t]), values[j * k + t]) for t in range(n)])
    return [int(x) for x in host[:b]], out


def sample_to_host(logits: torch.Tensor, batch: SamplingBatch | None) -> tuple[list[int], list[Logprobs | None]]:
    """`sample_for_host` and `read_back` at once: the host waits for the device."""
    ids, packed = sample_for_host(logits, batch)
    return read_back(packed.tolist(), batch, len(ids))
