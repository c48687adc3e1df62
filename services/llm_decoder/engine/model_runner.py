"""Tensors in, next tokens out: a step's flattened inputs, image rows spliced per chunk, the model, batched sampling.

Host work per step is proportional to the step's new tokens, not to the sequences' lengths: block tables live on the
device (a running sequence owns a row and only its new blocks are copied), and all of a step's small inputs travel in
one host->device copy. On CUDA, decode-only steps replay CUDA graphs captured for a few batch sizes.

`launch` never waits for the device and `finish` waits only for its own step, so the engine can queue a step before
reading back the one before it: the host's work for a step (scheduling, inputs, reading tokens back, streaming them)
runs while the device computes the next one, whose decode inputs are the previous step's ids, still on the device.
"""
import functools
from dataclasses import dataclass, field

import torch

from services.common.cuda_graphs import bucket_sizes, record
from services.llm_decoder.engine.block_manager import BlockManager
from services.llm_decoder.engine.context import BatchContext, cpu_decode_rows
from services.llm_decoder.engine.sampler import (Logprobs, PenaltyHistory, SamplingBatch, logit_bias_of, read_back,
                                                 sample_for_host, sample_to_host, to_device)
from services.llm_decoder.engine.sequence import SamplingParams, Sequence


@dataclass(eq=False)
class Launched:
    """A step queued on the device, its tokens on their way back to the host."""
    batch: list[tuple[Sequence, int]]
    sampled: list[Sequence]             # the sequences whose next token it samples, in row order
    sampling: SamplingBatch | None = None
    ids: torch.Tensor | None = None     # the sampled ids on the device: the next step's inputs
    host: torch.Tensor | None = None    # sample_for_host's packed tensor, copied (or being copied) to the host
    copied: object = None               # CUDA: the event recorded after that copy
    index: dict = field(init=False)     # sequence -> its row of `ids`

    def __post_init__(self):
        self.index = {seq: i for i, seq in enumerate(self.sampled)}


class ModelRunner:
    def __init__(self, model, blocks: BlockManager, num_blocks: int, max_rows: int, max_model_len: int, device: str,
                 dtype: torch.dtype, cuda_graphs: bool = True):
        self.model, self.blocks, self.device = model, blocks, torch.device(device)
        self.block_size = bs = blocks.block_size
        self.max_blocks = -(-max_model_len // bs)
        for attn in model.kv_layers():  # one spare block: padded rows of a graph batch write their K/V there
            attn.k_cache = torch.zeros(num_blocks + 1, bs, attn.kv_heads, attn.head_dim, device=device, dtype=dtype)
            attn.v_cache = torch.zeros_like(attn.k_cache)
        self.scratch_slot = num_blocks * bs
        self.no_history = PenaltyHistory(torch.empty(0, dtype=torch.int64, device=device))  # a row without penalties
        self.tables = torch.zeros(max_rows, self.max_blocks, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if cuda_graphs and self.device.type == "cuda":
            self.capture(max_rows)

    @torch.inference_mode()
    def launch(self, batch: list[tuple[Sequence, int]], prev: "Launched | None" = None) -> "Launched":
        """Queue a step on the device: `n` new tokens of each sequence, and the next token of each one whose tokens
        are then all computed, copied back without waiting (`finish` reads them). A sequence's last token may still
        be `prev`'s, unread (its `num_pending`): it is taken from prev's ids on the device."""
        self._sync_tables([seq for seq, _ in batch])
        bs, ids, positions, slots, cu, lens, rows, last, done = self.block_size, [], [], [], [0], [], [], [], []
        image_at, image_rows, fill, source = [], [], [], []
        for seq, n in batch:
            start, end, known = seq.num_cached, seq.num_cached + n, len(seq.token_ids)
            if n == 1:  # decode (or a one-token prompt chunk): plain arithmetic, no tensors
                ids.append(seq.token_ids[start] if start < known else 0)
                positions.append(start)
                slots.append(seq.block_table[start // bs] * bs + start % bs)
            else:
                ids += seq.token_ids[start:end] + [0] * (end - max(start, known))
                positions += range(start, end)
                pos = torch.arange(start, end)
                slots += (torch.tensor(seq.block_table)[pos // bs] * bs + pos % bs).tolist()
            if start < seq.num_prompt:  # a prompt chunk, however short: a step's budget may leave it one token
                at, img = seq.image_rows(start, end)
                if at:
                    image_at += [p - start + cu[-1] for p in at]
                    image_rows.append(img)
            cu.append(cu[-1] + n)
            if end > known:  # its last token is prev's, still on the device
                fill.append(cu[-1] - 1)
                source.append(prev.index[seq])
            lens.append(end)
            rows.append(seq.row)
            done.append(end == len(seq))  # its next token is sampled in this step
            if done[-1]:
                last.append(cu[-1] - 1)
        t, b, f = len(ids), len(batch), len(fill)
        dev = to_device(ids + positions + slots + lens + cu + rows + last + fill + source, torch.int64, self.device)
        ids_d, pos_d, slots_d = dev[:t], dev[t:2 * t], dev[2 * t:3 * t]
        lens_d, cu_d = dev[3 * t:3 * t + b].int(), dev[3 * t + b:3 * t + 2 * b + 1].int()
        tail = len(dev) - 2 * f  # where fill and source start
        rows_d, last_d = dev[3 * t + 2 * b + 1:3 * t + 3 * b + 1], dev[3 * t + 3 * b + 1:tail]
        if fill:
            ids_d.index_copy_(0, dev[tail:tail + f], prev.ids.index_select(0, dev[tail + f:]))

        max_len = max(lens)
        if t == b and not image_rows and b in self.graphs and self.model.rope_is_static(max_len):
            logits = self._replay(b, ids_d, pos_d, slots_d, lens_d, rows_d)
            if len(last) < b:  # a prompt's one-token chunk that is not its end: no token to sample there
                logits = logits[last_d]
        else:
            width = -(-max_len // bs)
            ctx = BatchContext(cu_d, lens_d, self.tables[rows_d, :width], slots_d, max(n for _, n in batch), max_len,
                               [(cu[i], cu[i + 1]) for i in range(b)])
            if self.device.type == "cpu":  # for every layer's attention
                ctx.decode_rows = cpu_decode_rows(ctx, bs)
            embeds = self.model.embed(ids_d)
            if image_rows:
                embeds[to_device(image_at, torch.int64, self.device)] = self._rows_to_device(image_rows).to(embeds)
            hidden = self.model(embeds, pos_d, ctx)
            logits = self.model.logits(hidden[last_d])
        sampled = [seq for (seq, _), d in zip(batch, done) if d]
        step = Launched(batch, sampled)
        if sampled:
            params = [s.params for s in sampled]
            histories, pending = None, None
            if any(p.uses_penalties for p in params):
                histories = [PenaltyHistory.of(s, self.device) if s.params.uses_penalties else self.no_history
                             for s in sampled]
                waiting = [(j, prev.index[s]) for j, s in enumerate(sampled) if s.num_pending]
                if waiting:  # their last tokens are prev's, on the device: counted there
                    at = to_device(waiting, torch.int64, self.device)
                    pending = at[:, 0], prev.ids.index_select(0, at[:, 1])
            step.sampling = SamplingBatch.build(params, [s.num_output + s.num_pending for s in sampled], histories,
                                                logits.shape[-1], self.device, pending,
                                                [logit_bias_of(s, self.device) for s in sampled])
            step.ids, packed = sample_for_host(logits, step.sampling)
            step.host = packed.to("cpu", non_blocking=True)
            if self.device.type == "cuda":
                step.copied = torch.cuda.Event()
                step.copied.record()
        # A step is queued whole or not at all: the sequences move on only once nothing above can raise, so a step
        # that fails can be run again.
        for seq, n in batch:
            seq.num_cached += n
        for seq in sampled:
            seq.num_pending += 1
        return step

    @staticmethod
    def finish(step: "Launched") -> list[tuple[int, Logprobs | None]]:
        """Wait for a launched step's tokens: (id, log-probabilities or None) of each sampled sequence, in order; id -1
        for a sequence whose logits were not finite."""
        if not step.sampled:
            return []
        if step.copied is not None:
            step.copied.synchronize()
        return list(zip(*read_back(step.host.tolist(), step.sampling, len(step.sampled))))

    def _rows_to_device(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """A step's image rows (host tensors) on the device, gathered into pinned memory on CUDA so that the copy
        (27 MB for a 13-tile image at 8B widths) is queued behind the step before it instead of waiting for it."""
        if self.device.type != "cuda" or rows[0].is_cuda:  # on the device already (bench.decoder's rows)
            return torch.cat(rows).to(self.device)
        dtype = functools.reduce(torch.promote_types, (r.dtype for r in rows))
        host = torch.empty((sum(r.shape[0] for r in rows), *rows[0].shape[1:]), dtype=dtype, pin_memory=True)
        torch.cat(rows, out=host)
        return host.to(self.device, non_blocking=True)  # the host allocator keeps `host` until the copy is done

    def _sync_tables(self, seqs: list[Sequence]) -> None:
        """Copy the block-table entries added since the last step to the sequences' device rows."""
        r, c, v = [], [], []
        for seq in seqs:
            for i in range(seq.synced_blocks, len(seq.block_table)):
                r.append(seq.row)
                c.append(i)
                v.append(seq.block_table[i])
            seq.synced_blocks = len(seq.block_table)
        if v:
            idx = to_device([r, c, v], torch.int64, self.device)
            self.tables[idx[0], idx[1]] = idx[2].int()

    # ---------------------------------------------------------------- CUDA graphs for decode steps

    @torch.inference_mode()
    def capture(self, max_bs: int) -> None:
        """Capture decode steps at a few batch sizes; a batch runs in the smallest graph that holds it, padded rows
        writing their K/V to the spare block and attending to nothing."""
        self.graph_sizes = bucket_sizes(max_bs)
        n = max_bs
        self.g_ids = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.g_pos = torch.zeros_like(self.g_ids)
        self.g_slots = torch.full_like(self.g_ids, self.scratch_slot)
        self.g_lens = torch.zeros(n, dtype=torch.int32, device=self.device)
        self.g_cu = torch.arange(n + 1, dtype=torch.int32, device=self.device)
        self.g_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=self.device)
        # Graphs serve steps whose rope comes from the precomputed table (see `step`), so they are captured so.
        max_len = min(self.max_blocks * self.block_size, self.model.cfg.max_position_embeddings)
        pool = None
        for size in reversed(self.graph_sizes):
            ctx = BatchContext(self.g_cu[:size + 1], self.g_lens[:size], self.g_tables[:size], self.g_slots[:size], 1,
                               max_len, [(i, i + 1) for i in range(size)])

            def forward(size=size, ctx=ctx):
                embeds = self.model.embed(self.g_ids[:size])
                return self.model.logits(self.model(embeds, self.g_pos[:size], ctx))

            graph, out = record(forward, pool)
            pool = graph.pool()
            self.graphs[size] = (graph, out)
        self.graphs = {size: self.graphs[min(s for s in self.graph_sizes if s >= size)]
                       for size in range(1, max_bs + 1)}

    def _replay(self, b: int, ids, pos, slots, lens, rows) -> torch.Tensor:
        graph, logits = self.graphs[b]
        size = logits.shape[0]
        self.g_ids[:b], self.g_pos[:b], self.g_slots[:b], self.g_lens[:b] = ids, pos, slots, lens
        self.g_slots[b:size], self.g_lens[b:size] = self.scratch_slot, 0
        self.g_tables[:b] = self.tables[rows]
        graph.replay()
        return logits[:b]


@torch.inference_mode()
def profile_prefill_memory(model, num_tokens: int, block_size: int, max_rows: int, device: str,
                           dtype: torch.dtype) -> int:
    """Peak GPU memory (bytes) of the largest step: the weights, a prefill of `num_tokens` tokens, and sampling
    `max_rows` rows with every filter and log-probabilities on. The KV cache gets what the memory budget leaves beyond
    it."""
    blocks = -(-num_tokens // block_size)
    for attn in model.kv_layers():
        attn.k_cache = torch.zeros(blocks, block_size, attn.kv_heads, attn.head_dim, device=device, dtype=dtype)
        attn.v_cache = torch.zeros_like(attn.k_cache)
    torch.cuda.reset_peak_memory_stats(device)
    lens = torch.tensor([num_tokens], dtype=torch.int32, device=device)
    ctx = BatchContext(torch.tensor([0, num_tokens], dtype=torch.int32, device=device), lens,
                       torch.arange(blocks, dtype=torch.int32, device=device)[None],
                       torch.arange(num_tokens, device=device), num_tokens, num_tokens, [(0, num_tokens)])
    hidden = model(model.embed(torch.zeros(num_tokens, dtype=torch.int64, device=device)),
                   torch.arange(num_tokens, device=device), ctx)
    logits = model.logits(hidden[-1:].expand(max_rows, -1))
    params = [SamplingParams(1, temperature=1.0, top_p=0.9, top_k=50, min_p=0.05, repetition_penalty=1.1,
                             logprobs=20, logit_bias=((0, 1.0),))] * max_rows
    history = PenaltyHistory(torch.zeros(1, dtype=torch.int64, device=device), {0: 1})
    sample_to_host(logits, SamplingBatch.build(params, [0] * max_rows, [history] * max_rows, logits.shape[-1], device))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    for attn in model.kv_layers():
        attn.k_cache = attn.v_cache = torch.empty(0)
    torch.cuda.empty_cache()
    return peak
