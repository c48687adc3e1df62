"""The decoder engine against transformers' `generate` on the same random weights, in the same run.

A transformers causal LM (Qwen2ForCausalLM or LlamaForCausalLM, sdpa attention, default dynamic KV cache) is built at
the chosen shape with random weights; its tensors are copied into the serving model (q/k/v and gate/up fused), so
both hold identical weights and greedy outputs can be compared. Measured, each as engine / transformers ratios:

1. Throughput at 1, 16 and 64 streams (--streams): random prompts of --prompt-len tokens, --new-tokens greedy tokens
   each, EOS ignored. transformers: one batched `generate` over all streams (the baseline); engine: every sequence
   added at once and stepped to completion. A short warm-up of both precedes each measurement; every run gets
   fresh prompts (the engine's prefix cache never serves one); --repeat N reports the median of N runs. Besides
   tok/s, the decode step time of each (engine: after every stream has its first token; transformers: the time of
   a 1-token `generate` subtracted) and, on CUDA, the fraction of the HBM limit it reaches (the 1-stream row is the
   bandwidth-bound one): bytes read per decode step (weights without the embedding table, plus the KV cache) /
   step time, against --hbm-bandwidth.
2. Time to first token of an image prompt (--ttft-tiles x 256 image-context tokens + ~50 text tokens, random image
   rows as `image_embeds`) on the engine: alone, and added while --ttft-streams other streams decode, with those
   streams' longest inter-token gap around that prefill (against their median gap before it); and --ttft-shared
   questions about one image sent together, until each has its first token, against one alone.
3. Greedy agreement: how many leading tokens the engine and transformers share. fp32 on the CPU must agree on at
   least the first 16 tokens of the 1-stream case (else exit status 1); elsewhere (bf16) only reported.
4. --stack (CPU only; on by default with --device cpu): the whole stack (Redis, vision encoder, decoder, gateway)
   on the tiny default checkpoint, --stack-requests concurrent text-only chat completions over HTTP (greedy,
   max_tokens --stack-max-tokens, counting `usage.completion_tokens`), against transformers'
   InternVLForConditionalGeneration in-process: one batched `generate` on the same prompt ids (the gateway's
   PromptBuilder), stopping at the same stop tokens.

    python -m bench.decoder --device cuda --shape internlm2_5_7b --dtype bfloat16 --out bench/results/decoder-h200.md
    python -m bench.decoder --device cuda --shape qwen2_5_0_5b --dtype bfloat16 --out bench/results/decoder-h200-0_5b.md
    python -m bench.decoder --device cpu --out /tmp/decoder-cpu.md      # qwen2_5_0_5b fp32, small sizes, + stack
    python -m bench.decoder --device cpu --smoke --out /tmp/decoder.md  # tiny shapes, seconds (the test runs this)

The markdown report goes to --out and the same numbers as JSON next to it (--out with .json). The GPU path needs only
torch and transformers (no gateway, Redis or gRPC imports). bench/awq_engine.py runs this file's engine models and
helpers with AWQ linears (--shape qwen2_5_3b, InternVL2_5-4B's LLM, is its default) against bf16, without transformers.
"""
import argparse
import asyncio
import datetime
import gc
import itertools
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import save, sync
from services.common.checkpoint import TextConfig
from services.llm_decoder.engine.llm_engine import LLMEngine
from services.llm_decoder.engine.sequence import SamplingParams, Sequence
from services.llm_decoder.models.llama import LlamaForCausalLM
from services.llm_decoder.models.qwen2 import Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Shape:
    family: str           # "qwen2" (q/k/v biases) or "llama" (InternLM2.5 as the native layout serves it)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    inter: int
    vocab: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None = None


SHAPES = {
    "tiny": Shape("qwen2", 64, 2, 4, 2, 128, 1024, 1e-6, 1e6),  # the tiny test checkpoint's LLM (vocab rounded up)
    "qwen2_5_0_5b": Shape("qwen2", 896, 24, 14, 2, 4864, 151674, 1e-6, 1e6),  # InternVL2_5-1B
    "qwen2_5_3b": Shape("qwen2", 2048, 36, 16, 2, 11008, 151674, 1e-6, 1e6),  # InternVL2_5-4B (and its AWQ)
    # InternVL2_5-8B: dynamic NTK x2 as the checkpoint (identical to plain rope below 32768 positions).
    "internlm2_5_7b": Shape("llama", 4096, 32, 32, 8, 14336, 92553, 1e-5, 1e6, {"rope_type": "dynamic", "factor": 2.0}),
}
MAX_POSITIONS = 32768
TEXT_AROUND_IMAGE = 50   # text tokens of the image prompt, half before the image, half after
AGREE_MIN = 16           # fp32 CPU: leading greedy tokens the engine must share with transformers


# ---------------------------------------------------------------------------------------------- models and weights

def text_config(shape: Shape, awq_group_size: int = 0) -> TextConfig:
    """Untied head, as InternVL checkpoints have; awq_group_size > 0: 4-bit AWQ decoder-layer linears."""
    return TextConfig(family=shape.family, hidden_size=shape.hidden, num_layers=shape.layers, num_heads=shape.heads,
                      num_kv_heads=shape.kv_heads, head_dim=shape.hidden // shape.heads,
                      intermediate_size=shape.inter, vocab_size=shape.vocab, rms_norm_eps=shape.rms_eps,
                      rope_theta=shape.rope_theta, rope_scaling=shape.rope_scaling,
                      max_position_embeddings=MAX_POSITIONS, attention_bias=shape.family == "qwen2",
                      tie_word_embeddings=False, awq_group_size=awq_group_size)


def build_transformers(shape: Shape, device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """transformers' causal LM at `shape` on `device`, random weights drawn in place (see `randomize_`)."""
    from transformers import LlamaConfig, LlamaForCausalLM as HFLlama, Qwen2Config, Qwen2ForCausalLM as HFQwen2

    rope = {"rope_type": "default", "rope_theta": shape.rope_theta} | (shape.rope_scaling or {})
    common = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                  num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                  intermediate_size=shape.inter, hidden_act="silu", rms_norm_eps=shape.rms_eps,
                  max_position_embeddings=MAX_POSITIONS, rope_parameters=rope, tie_word_embeddings=False,
                  eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if shape.family == "qwen2":
        cls, config = HFQwen2, Qwen2Config(**common)
    else:
        cls, config = HFLlama, LlamaConfig(attention_bias=False, mlp_bias=False, **common)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    randomize_(model, seed)
    model.generation_config.eos_token_id = None  # never stop early: every stream makes --new-tokens tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """The tiny checkpoints' spread (tools.make_tiny_checkpoint), drawn in place on the model's device: greedy
    decoding gives varied tokens with clear top-1 margins, so fp32 implementations agree token for token."""
    g = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "norm" in name and name.endswith(".weight"):
            p.normal_(1.0, 0.1, generator=g)
        elif name.endswith(".bias"):
            p.normal_(0.0, 0.05, generator=g)
        elif "embed_tokens" in name:
            p.normal_(0.0, 1.0, generator=g)
        else:  # matrices: std 2/sqrt(fan_in)
            p.normal_(0.0, 2.0 / p.shape[-1] ** 0.5, generator=g)


def build_engine_model(shape: Shape, device: str, dtype: torch.dtype, awq_group_size: int = 0) -> LlamaForCausalLM:
    """The serving model, allocated (uninitialized) in `dtype` on `device`, as services.llm_decoder.models does
    (AWQ linears keep their int32/fp16 tensors)."""
    cls = Qwen2ForCausalLM if shape.family == "qwen2" else LlamaForCausalLM
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(text_config(shape, awq_group_size))
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    model.tie_weights()
    return model.eval()


@torch.no_grad()
def copy_weights(src: torch.nn.Module, dst: LlamaForCausalLM) -> None:
    """transformers' state dict into the serving model, through its checkpoint renaming (fused q/k/v, gate/up).

    Every parameter and every shard of a fused one must be filled."""
    params = dict(dst.named_parameters())
    owner = lambda name: dst.get_submodule(name.rpartition(".")[0])  # noqa: E731
    filled = set()
    for name, tensor in src.state_dict().items():
        for param_name, shard, t in dst.checkpoint_name(name, tensor):
            param = params[param_name]
            if shard is None:
                param.copy_(t)
            else:
                owner(param_name).load_shard(param, t, shard)
            filled.add((param_name, shard))
    expected = {(n, s) for n in params for s in getattr(owner(n), "shards", (None,))}
    if missing := sorted(map(str, expected - filled)):
        raise RuntimeError(f"weights not copied: {', '.join(missing[:8])}")


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every weight but the embedding table (a few rows are looked up)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)


def kv_bytes_per_token(shape: Shape, dtype: torch.dtype) -> int:
    return 2 * shape.layers * shape.kv_heads * (shape.hidden // shape.heads) * dtype.itemsize


# ------------------------------------------------------------------------------------------------------ running

def decode_step_ms(run: dict, new_tokens: int) -> float:
    """An engine run's decode step time (`run_engine`'s result): after every stream has its first token."""
    return 1000 * (run["end"] - run["first"]) / max(1, new_tokens - 1)


def read_bandwidth(device: str, gib: int = 4) -> float:
    """B/s a plain read of `gib` GiB reaches on this GPU (torch's sum of a bf16 tensor, best of 10): what streaming
    the weights can reach at best, against the data sheet's figure."""
    t = torch.ones(gib << 29, dtype=torch.bfloat16, device=device)
    best = float("inf")
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t.sum(dtype=torch.float32)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    size = t.numel() * t.element_size()
    del t
    torch.cuda.empty_cache()
    return size / best


def hbm_fraction(bytes_per_step: int, step_ms: float, bandwidth: float) -> float:
    """The share of the memory-bandwidth limit a decode step reaches (0 when no time was measured)."""
    return bytes_per_step / (step_ms / 1000) / bandwidth if step_ms else 0.0


def make_engine(model, num_blocks: int, args, dtype: torch.dtype) -> LLMEngine:
    """The engine as the decoder serves it: on CUDA, warmed up before the first measurement."""
    engine = LLMEngine(model, num_blocks=num_blocks, block_size=args.block_size,
                       max_batched_tokens=args.max_batched_tokens, max_running=args.max_running, device=args.device,
                       dtype=dtype)
    if args.device.startswith("cuda"):
        start = time.perf_counter()
        engine.warm_up(model.cfg.vocab_size)
        print(f"engine warmed up in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return engine


def new_sequence(seq_id: str, prompt: list[int], max_tokens: int, image_embeds: torch.Tensor | None = None,
                 image_token_id: int = -1, params: SamplingParams | None = None) -> Sequence:
    return Sequence(id=seq_id, prompt_ids=list(prompt), params=params or SamplingParams(max_tokens=max_tokens),
                    image_embeds=image_embeds, image_token_id=image_token_id)


def until_first_token(engine: LLMEngine, seq: Sequence, step) -> None:
    """`step()` until `seq` has its first token (an engine that ends it without one is an error, not a hang)."""
    while not seq.num_output:
        if not engine.has_work():
            raise RuntimeError(f"the engine finished {seq.id} without a token")
        step()


def run_engine(engine: LLMEngine, prompts: list[list[int]], new_tokens: int, device: str, tag: str,
               params: SamplingParams | None = None) -> dict:
    """All prompts added at once, stepped to completion (greedy, or with `params`). Returns wall time, the time every
    stream had its first token (the prefill), and the outputs."""
    seqs = [new_sequence(f"{tag}-{i}", p, new_tokens, params=params) for i, p in enumerate(prompts)]
    sync(device)
    start = time.perf_counter()
    for seq in seqs:
        engine.scheduler.add(seq)
    first = None
    while engine.has_work():
        engine.step()
        if first is None and all(s.num_output for s in seqs):
            sync(device)
            first = time.perf_counter()
    sync(device)
    end = time.perf_counter()
    return {"s": end - start, "prefill_s": (first or end) - start, "end": end, "first": first or end,
            "outputs": [list(s.output_ids) for s in seqs]}


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], new_tokens: int, device: str, pad_id: int = 0,
                eos: list[int] | None = None) -> dict:
    """One batched greedy `generate` over all prompts, left-padded with an attention mask."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    sync(device)
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=pad_id)
    sync(device)
    return {"s": time.perf_counter() - start, "outputs": out[:, width:].tolist()}


def agreement(a: list[int], b: list[int]) -> int:
    """Leading tokens two greedy outputs share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


_FRESH = itertools.count(1)


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Random ids below vocab - 1 (the last id is the image-context token), from a seed not used before in this run:
    no two measurements share a prompt, so the engine's prefix cache (where it has one) never serves one."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + next(_FRESH))
    return torch.randint(0, vocab - 1, (n, length), generator=g).tolist()


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["s"])[len(runs) // 2]


def throughput(hf, engine, shape: Shape, dtype: torch.dtype, streams: int, args, bytes_per_step: int) -> dict:
    new, warm = args.new_tokens, min(4, args.new_tokens)
    warm_prompts = random_prompts(streams, args.prompt_len, shape.vocab, args.seed)
    hf_generate(hf, warm_prompts, warm, args.device)
    hf_generate(hf, warm_prompts, 1, args.device)
    run_engine(engine, warm_prompts, warm, args.device, f"warm{streams}")
    engine_runs, hf_runs, hf_prefills, agree, hits = [], [], [], [], 0
    for r in range(args.repeat):  # fresh prompts each time; the median run (by wall time) of each is reported
        prompts = random_prompts(streams, args.prompt_len, shape.vocab, args.seed)
        before = engine.scheduler.cached_tokens
        e = run_engine(engine, prompts, new, args.device, f"tp{streams}-{r}")
        hits += engine.scheduler.cached_tokens - before
        h = hf_generate(hf, prompts, new, args.device)
        hf_prefills.append(hf_generate(hf, prompts, 1, args.device)["s"])  # for transformers' decode step time
        agree.append([agreement(a, b) for a, b in zip(e["outputs"], h["outputs"])])
        engine_runs.append(e)
        hf_runs.append(h)
    e, h, h1_s = median_run(engine_runs), median_run(hf_runs), statistics.median(hf_prefills)
    e_tokens, h_tokens = sum(map(len, e["outputs"])), sum(map(len, h["outputs"]))
    steps = max(1, new - 1)
    row = {"streams": streams, "prompt_len": args.prompt_len, "new_tokens": new, "repeat": args.repeat,
           "engine_tokens": e_tokens, "hf_tokens": h_tokens, "engine_s": e["s"], "hf_s": h["s"],
           "engine_tok_s": e_tokens / e["s"], "hf_tok_s": h_tokens / h["s"],
           "engine_prefill_s": e["prefill_s"], "hf_prefill_s": h1_s,
           "engine_step_ms": decode_step_ms(e, new),
           "hf_step_ms": 1000 * max(h["s"] - h1_s, 0.0) / steps,
           "agree_min": min(min(a) for a in agree), "agree_stream0": agree[0][0],
           "engine_prefix_cache_hit_tokens": hits,
           "engine_first_tokens": engine_runs[0]["outputs"][0][:AGREE_MIN],
           "hf_first_tokens": hf_runs[0]["outputs"][0][:AGREE_MIN]}
    row["ratio"] = row["engine_tok_s"] / row["hf_tok_s"]
    row["step_ratio"] = row["hf_step_ms"] / row["engine_step_ms"] if row["engine_step_ms"] else float("nan")
    if args.device.startswith("cuda"):
        # Bytes of one decode step: the weights once, plus the KV cache of every stream at mid-generation.
        kv = streams * (args.prompt_len + new // 2) * kv_bytes_per_token(shape, dtype)
        row["bytes_per_step"] = bytes_per_step + kv
        for who in ("engine", "hf"):
            row[f"{who}_hbm_fraction"] = hbm_fraction(row["bytes_per_step"], row[f"{who}_step_ms"], args.hbm_bandwidth)
        row["engine_read_fraction"] = hbm_fraction(row["bytes_per_step"], row["engine_step_ms"], args.read_bandwidth)
    return row


# What a decode step costs with each kind of sampling setting, against greedy (bench `sampling`).
SAMPLING_SETTINGS = {
    "greedy": {},
    "temperature 0.8, top_p 0.9, top_k 50 (seeded)": dict(temperature=0.8, top_p=0.9, top_k=50, seed=0),
    "repetition 1.1, frequency 0.2, presence 0.2 penalties": dict(repetition_penalty=1.1, frequency_penalty=0.2,
                                                                   presence_penalty=0.2),
    "top 5 log-probabilities": dict(logprobs=5),
    "logit_bias on 300 tokens (OpenAI's most)": dict(logit_bias=tuple((t, 1.0) for t in range(300))),
}


def sampling(engine, shape: Shape, args) -> dict:
    """Decode steps of long prompts with each kind of sampling setting against greedy ones (fresh prompts each run,
    the better of two runs each): what the sampler's work and the penalties' token histories cost a step."""
    streams, length, new = args.sampling_streams, args.sampling_prompt_len, args.new_tokens
    run_engine(engine, random_prompts(streams, length, shape.vocab, args.seed), 2, args.device, "sampling-warm")
    rows = []
    for name, settings in SAMPLING_SETTINGS.items():
        params = SamplingParams(new, **settings)
        step_ms = min(decode_step_ms(run_engine(engine, random_prompts(streams, length, shape.vocab, args.seed), new,
                                                args.device, f"sampling-{len(rows)}-{r}", params), new)
                      for r in range(2))
        rows.append({"settings": name, "step_ms": step_ms, "vs_greedy": step_ms / (rows[0]["step_ms"] if rows
                                                                                   else step_ms)})
    return {"streams": streams, "prompt_len": length, "new_tokens": new, "rows": rows}


def image_prompt(shape: Shape, tiles: int, seed: int) -> list[int]:
    """~50 random text tokens around an image of `tiles` x 256 image-context tokens (the last vocabulary id)."""
    text = random_prompts(1, TEXT_AROUND_IMAGE, shape.vocab, seed)[0]
    half = TEXT_AROUND_IMAGE // 2
    return text[:half] + [shape.vocab - 1] * (tiles * 256) + text[half:]


def ttft(engine, shape: Shape, dtype: torch.dtype, args) -> dict:
    """The image prompt's time to first token, alone and while --ttft-streams other streams decode."""
    rows = args.ttft_tiles * 256
    g = torch.Generator().manual_seed(args.seed)
    embeds = torch.randn(rows, shape.hidden, generator=g).to(args.device, dtype)

    def image_seq(tag: str) -> Sequence:
        # Other text (and a fresh sequence, so another image identity) every time: no prefix-cache hit.
        ids = image_prompt(shape, args.ttft_tiles, args.seed)
        return new_sequence(tag, ids, 1, image_embeds=embeds, image_token_id=shape.vocab - 1)

    def alone(tag: str) -> float:
        seq = image_seq(tag)
        sync(args.device)
        start = time.perf_counter()
        engine.scheduler.add(seq)
        until_first_token(engine, seq, engine.step)
        sync(args.device)
        took = time.perf_counter() - start
        while engine.has_work():
            engine.step()
        return took

    alone("ttft-warm")
    alone_s = statistics.median(alone(f"ttft-{i}") for i in range(args.ttft_repeat))

    # Questions about one image sent together (the cards' batch_chat; the gateway encodes the image once): until
    # every one has its first token, and the prompt tokens the engine computed for them.
    ids = image_prompt(shape, args.ttft_tiles, args.seed)
    questions = [new_sequence(f"shared-{i}", ids[:-3] + [7 + i, 8 + i, 9 + i], 1, image_embeds=embeds,
                              image_token_id=shape.vocab - 1) for i in range(args.ttft_shared)]
    for seq in questions:
        seq.image_keys = [("shared-image", rows)]
    computed = engine.computed_tokens
    sync(args.device)
    start = time.perf_counter()
    for seq in questions:
        engine.scheduler.add(seq)
    for seq in questions:
        until_first_token(engine, seq, engine.step)
    sync(args.device)
    shared_s = time.perf_counter() - start
    shared_computed = engine.computed_tokens - computed
    while engine.has_work():
        engine.step()

    # Under load: the decode streams make a few tokens first, then the image prompt arrives.
    decode_tokens = args.ttft_decode_tokens
    prompts = random_prompts(args.ttft_streams, args.prompt_len, shape.vocab, args.seed)
    decoders = [new_sequence(f"bg-{i}", p, decode_tokens) for i, p in enumerate(prompts)]
    times: dict[str, list[float]] = {s.id: [] for s in decoders}

    def step_and_record() -> None:
        engine.step()
        now = time.perf_counter()
        for s in decoders:
            n = s.num_output
            while len(times[s.id]) < n:
                times[s.id].append(now)

    for s in decoders:
        engine.scheduler.add(s)
    lead = min(4, decode_tokens - 1)
    while engine.has_work() and not all(s.num_output >= lead for s in decoders):
        step_and_record()
    seq = image_seq("ttft-loaded")
    sync(args.device)
    added = time.perf_counter()
    engine.scheduler.add(seq)
    until_first_token(engine, seq, step_and_record)
    sync(args.device)
    first = time.perf_counter()
    # One more token of every decode stream after the image's first token, so the gaps spanning its prefill close.
    marks = {s.id: s.num_output for s in decoders}
    while engine.has_work() and any(s.num_output == marks[s.id] and s.finish_reason is None
                                              for s in decoders):
        step_and_record()
    outlived = all(s.num_output > marks[s.id] for s in decoders)
    while engine.has_work():
        step_and_record()
    before, around = [], []
    for s in decoders:
        t = times[s.id]
        for a, b in zip(t, t[1:]):
            if b <= added:
                before.append(b - a)
            elif a <= first:  # a gap that overlaps [image added, its first token]
                around.append(b - a)
    return {"tiles": args.ttft_tiles, "prompt_tokens": rows + TEXT_AROUND_IMAGE, "alone_ms": 1000 * alone_s,
            "shared_questions": args.ttft_shared, "shared_ms": 1000 * shared_s, "shared_vs_alone": shared_s / alone_s,
            "shared_computed": shared_computed,
            "loaded_ms": 1000 * (first - added), "decode_streams": args.ttft_streams,
            "decode_gap_median_ms": 1000 * statistics.median(before) if before else float("nan"),
            "decode_gap_max_ms": 1000 * max(around) if around else float("nan"),
            "decodes_outlived_prefill": outlived}


# ---------------------------------------------------------------------------------------------- the whole stack

STACK_TOPICS = ["the old lighthouse at the edge of the harbor", "a small red boat on a calm blue lake",
                "the market that opens early in the morning", "my grandmother's garden behind her kitchen",
                "mountains and rivers in the northern region", "the museum's newest exhibition",
                "how a vision encoder turns an image into tokens", "trains and buses moving through the city"]


def stack_questions(n: int) -> list[str]:
    return [f"Question {i}: tell me about {STACK_TOPICS[i % len(STACK_TOPICS)]}." + " Please." * (i % 3)
            for i in range(n)]


async def _chat_all(url: str, model: str, questions: list[str], max_tokens: int) -> tuple[float, list[dict]]:
    # aiohttp: the load generator must not be what limits the stack (httpx's client costs more CPU per request than
    # the gateway does, on the same two cores).
    import aiohttp

    connector = aiohttp.TCPConnector(limit=len(questions) + 4)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as client:
        async def one(q: str) -> dict:
            async with client.post("/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens,
                    "temperature": 0, "return_token_ids": True}) as r:
                r.raise_for_status()
                return await r.json()

        # Warm-up with the same load: connections opened, every code path run once; then the measured round.
        await asyncio.gather(*(one(f"Warm-up {i}: say something.") for i in range(len(questions))))
        start = time.perf_counter()
        answers = await asyncio.gather(*(one(q) for q in questions))
        return time.perf_counter() - start, answers


def run_stack(args, workdir: Path) -> dict:
    """The tiny stack over HTTP (concurrent requests) against transformers' batched generate in-process."""
    from services.common.checkpoint import read_model_config
    from services.gateway.prompt import PromptBuilder
    from services.gateway.schema import Message
    from tools.make_tiny_checkpoint import write_tiny_checkpoint
    from tools.run_local import start_redis, start_stack
    from transformers import InternVLForConditionalGeneration

    ckpt = write_tiny_checkpoint(workdir / "tiny-internvl2_5")
    questions = stack_questions(args.stack_requests)
    log_path = workdir / "stack.log"
    with open(log_path, "w") as log:
        redis_proc, redis_url = start_redis(log)
        try:
            stack = start_stack(str(ckpt), redis_url=redis_url, log=log)
            try:
                wall, answers = asyncio.run(_chat_all(stack.gateway_url, ckpt.name, questions,
                                                      args.stack_max_tokens))
            finally:
                stack.stop()
        except Exception:
            print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            redis_proc.terminate()
            redis_proc.wait()
    stack_tokens = sum(a["usage"]["completion_tokens"] for a in answers)

    builder = PromptBuilder(ckpt, read_model_config(ckpt))
    prompts = [builder.expand(builder.render([Message(role="user", content=q)])[0], []) for q in questions]
    hf = InternVLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa")
    hf.eval()
    pad = builder.tokenizer.pad_token_id or 0
    stops = list(builder.stop_token_ids)
    hf_generate(hf, prompts[:2], 4, "cpu", pad, stops)  # warm-up
    h = hf_generate(hf, prompts, args.stack_max_tokens, "cpu", pad, stops)
    hf_outputs = [cut_at_stop(o, stops) for o in h["outputs"]]
    hf_tokens = sum(map(len, hf_outputs))
    same = sum(a["choices"][0].get("token_ids") == o for a, o in zip(answers, hf_outputs))
    row = {"requests": len(questions), "max_tokens": args.stack_max_tokens, "stack_tokens": stack_tokens,
           "hf_tokens": hf_tokens, "stack_s": wall, "hf_s": h["s"], "stack_tok_s": stack_tokens / wall,
           "hf_tok_s": hf_tokens / h["s"], "same_answers": same, "checkpoint": "tiny-internvl2_5 (fp32, CPU)"}
    row["ratio"] = row["stack_tok_s"] / row["hf_tok_s"]
    return row


def cut_at_stop(tokens: list[int], stops: list[int]) -> list[int]:
    """A row of a batched generate up to and including its first stop token (the rest is padding)."""
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i + 1]
    return tokens


# ------------------------------------------------------------------------------------------------------ report

def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__} (CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} " \
           f"threads, torch {torch.__version__}"


def fmt(v, digits: int = 1) -> str:
    if isinstance(v, float):
        return "-" if v != v else f"{v:.{digits}f}"
    return str(v)


PROFILE_STEPS = 20


def decode_profile(engine: LLMEngine, shape: Shape, streams: int, args, steps: int = PROFILE_STEPS) -> dict:
    """Where a decode step's time goes: wall time per step, then (under torch.profiler) the device's kernel time
    per step, kernels per step and the kernels that take most of it. Wall minus kernel time is what the device
    spends outside kernels: waiting for the host (scheduling, input copies, sampling, the read-back) and the gaps
    between kernels, inside CUDA graphs too. On the CPU: the ops' own time instead of kernel time."""
    from torch.profiler import ProfilerActivity, profile
    cuda = args.device.startswith("cuda")
    seqs = [new_sequence(f"prof{streams}-{i}", p, 3 * steps + 4)
            for i, p in enumerate(random_prompts(streams, args.prompt_len, shape.vocab, args.seed))]
    for seq in seqs:
        engine.scheduler.add(seq)
    for seq in seqs:  # prefill, then every stream decodes
        until_first_token(engine, seq, engine.step)

    def wall_ms() -> float:
        sync(args.device)
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync(args.device)
        return 1000 * (time.perf_counter() - start) / steps

    overlap = engine.overlap
    engine.overlap = not overlap
    other_ms = wall_ms()  # the other way first, so both are timed on warm caches
    engine.overlap = overlap
    wall = wall_ms()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
        sync(args.device)
    for seq in seqs:
        engine.scheduler.finish(seq, "abort")
    kernels = [e for e in prof.events() if e.device_type.name == ("CUDA" if cuda else "CPU")]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.device_time if cuda else e.self_cpu_time_total)  # µs
    busy_ms = sum(map(sum, by_name.values())) / 1000 / steps
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:8]
    return {"streams": streams, "overlap": overlap, "wall_ms": wall, "kernel_ms": busy_ms,
            "outside_kernels_ms": wall - busy_ms, "kernels": len(kernels) / steps,
            "overlap_ms" if not overlap else "no_overlap_ms": other_ms,
            "top": [{"name": name[:90], "ms_per_step": sum(t) / 1000 / steps, "calls_per_step": len(t) / steps}
                    for name, t in top]}


def table(columns: list[tuple[str, str, int]], rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k, "-"), d) for k, _, d in columns) + " |" for r in rows]
    return lines


PROFILE_COLUMNS = [("streams", "streams", 0), ("overlap", "overlap", 0), ("wall_ms", "wall ms/step", 2),
                   ("kernel_ms", "kernel ms/step", 2), ("outside_kernels_ms", "outside kernels ms/step", 2),
                   ("kernels", "kernels/step", 0), ("no_overlap_ms", "wall without overlap ms/step", 2),
                   ("overlap_ms", "wall with overlap ms/step", 2)]
TP_COLUMNS = [("streams", "streams", 0), ("engine_tokens", "tokens", 0), ("engine_s", "engine s", 2),
              ("hf_s", "transformers s", 2), ("engine_tok_s", "engine tok/s", 1), ("hf_tok_s", "transformers tok/s", 1),
              ("ratio", "engine/transformers", 2), ("engine_prefill_s", "engine prefill s", 3),
              ("hf_prefill_s", "transformers prefill s", 3), ("engine_step_ms", "engine decode ms/step", 2),
              ("hf_step_ms", "transformers decode ms/step", 2), ("step_ratio", "decode step ratio", 2),
              ("agree_min", "greedy agreement (min over streams)", 0)]
HBM_COLUMNS = [("streams", "streams", 0), ("bytes_gb", "GB read / decode step", 3),
               ("engine_step_ms", "engine ms/step", 2), ("engine_hbm_pct", "engine % of HBM limit", 1),
               ("engine_read_pct", "engine % of measured read bandwidth", 1),
               ("hf_step_ms", "transformers ms/step", 2), ("hf_hbm_pct", "transformers % of HBM limit", 1)]
SHARED_COLUMNS = [("shared_questions", "questions", 0), ("prompt_tokens", "prompt tokens each", 0),
                  ("shared_ms", "all first tokens ms", 1), ("alone_ms", "one alone ms", 1),
                  ("shared_vs_alone", "together / alone", 2), ("shared_computed", "prompt tokens computed", 0)]
TTFT_COLUMNS = [("tiles", "tiles", 0), ("prompt_tokens", "prompt tokens", 0), ("alone_ms", "TTFT alone ms", 1),
                ("decode_streams", "decoding streams", 0), ("loaded_ms", "TTFT while decoding ms", 1),
                ("decode_gap_median_ms", "decode gap before ms (median)", 1),
                ("decode_gap_max_ms", "decode max gap around the prefill ms", 1),
                ("decodes_outlived_prefill", "decodes outlived the prefill", 0)]
SAMPLING_COLUMNS = [("settings", "settings", 0), ("step_ms", "decode ms/step", 2), ("vs_greedy", "/ greedy", 2)]
STACK_COLUMNS = [("requests", "requests", 0), ("max_tokens", "max_tokens", 0), ("stack_tokens", "stack tokens", 0),
                 ("stack_s", "stack s", 2), ("stack_tok_s", "stack tok/s", 1), ("hf_tokens", "transformers tokens", 0),
                 ("hf_s", "transformers s", 2), ("hf_tok_s", "transformers tok/s", 1),
                 ("ratio", "stack/transformers", 2), ("same_answers", "identical answers", 0)]


def report(result: dict) -> str:
    m = result["meta"]
    lines = [f"# Decoder engine vs transformers generate ({m['shape']}, {m['dtype']}, {m['device']})", "",
             f"- date: {m['date']}", f"- device: {m['device_name']}", f"- command: `{m['command']}`",
             f"- transformers {m['transformers']}; weights: random, identical in both "
             f"({m['params_m']:.2f}M parameters)", ""]
    if rows := result.get("throughput"):
        lines += [f"## Throughput: prompt {rows[0]['prompt_len']} tokens, {rows[0]['new_tokens']} new tokens per "
                  "stream (greedy, EOS ignored)", ""] + table(TP_COLUMNS, rows)
        lines += ["", "tok/s: generated tokens of all streams / wall time (prefill included); engine/transformers > 1: "
                  "the engine is faster. transformers: one batched `generate` (sdpa, dynamic cache). Engine: all "
                  "streams added at once, stepped to completion. Prefill s: engine until every stream has its first "
                  "token; transformers: a 1-token `generate`. Decode ms/step: engine after every stream's first "
                  "token; transformers: (N-token generate - 1-token generate) / (N - 1); decode step ratio: "
                  "transformers / engine. Agreement: leading greedy tokens equal in both. Fresh random prompts "
                  f"for every run; median of {rows[0].get('repeat', 1)} run(s).", ""]
        if hit := sum(r.get("engine_prefix_cache_hit_tokens", 0) for r in rows):
            lines += [f"WARNING: the engine's prefix cache served {hit} prompt tokens of the measured runs.", ""]
        if any("bytes_per_step" in r for r in rows):
            hbm = [r | {"bytes_gb": r["bytes_per_step"] / 1e9, "engine_hbm_pct": 100 * r["engine_hbm_fraction"],
                        "engine_read_pct": 100 * r.get("engine_read_fraction", float("nan")),
                        "hf_hbm_pct": 100 * r["hf_hbm_fraction"]} for r in rows if "bytes_per_step" in r]
            lines += [f"### Fraction of the HBM limit ({m['hbm_bandwidth'] / 1e12:.2f} TB/s)", ""]
            lines += table(HBM_COLUMNS, hbm)
            lines += ["", "Bytes per decode step: every weight but the embedding table, plus the streams' KV cache "
                      "at mid-generation; / decode step time / the bandwidth. Measured read bandwidth: "
                      f"{m.get('read_bandwidth', float('nan')) / 1e12:.2f} TB/s, torch's sum of a 4 GiB bf16 tensor "
                      "on this GPU in this run (best of 10): what streaming weights can reach at best.", ""]
    if t := result.get("ttft"):
        lines += ["## Time to first token of an image prompt (engine)", ""] + table(TTFT_COLUMNS, [t])
        lines += ["", "Random image rows as image_embeds. While decoding: added after the decode streams' first "
                  "tokens; the max gap is the longest wait between two tokens of a decode stream that overlaps the "
                  "image prefill.", ""]
        lines += ["### Questions about one image sent together", ""] + table(SHARED_COLUMNS, [t])
        lines += ["", "Each its own question after the same image (one cache key): the first prefills the image, "
                  "the others wait for it and take its blocks from the prefix cache (without that wait, each one "
                  "prefilled the image beside the first).", ""]
    if s := result.get("sampling"):
        lines += [f"## Decode steps by sampling settings (engine): {s['streams']} streams, prompts of "
                  f"{s['prompt_len']} tokens, {s['new_tokens']} new tokens", ""] + table(SAMPLING_COLUMNS, s["rows"])
        lines += ["", "Every stream with the same settings; fresh prompts, the better of two runs each. Penalties keep "
                  "each sequence's prompt ids on the device and its output counts as tokens come (the token still on "
                  "the device counted there).", ""]
    if prof := result.get("profile"):
        lines += ["## Where a decode step's time goes (engine)", ""] + table(PROFILE_COLUMNS, prof)
        lines += ["", f"Wall: {PROFILE_STEPS} decode steps timed alone, the engine as configured (overlap: each "
                  "step queued before the one before it is read back, the default on CUDA); the other way too, "
                  "timed just before. Kernel time and kernels per step: the same steps under torch.profiler (device "
                  "time of every kernel, CUDA-graph replays included; on the CPU the ops' own time); outside "
                  "kernels: wall - kernel time (the device waiting for the host, and the gaps between kernels).", ""]
        for p in prof:
            lines += [f"Top kernels at {p['streams']} stream(s), ms per step (calls per step):", ""]
            lines += [f"- {k['ms_per_step']:.3f} ({k['calls_per_step']:.0f}) `{k['name']}`" for k in p["top"]] + [""]
    if c := result.get("correctness"):
        lines += ["## Greedy agreement (1 stream)", "",
                  f"{c['agree']} of {c['new_tokens']} leading tokens equal ({c['verdict']}).",
                  f"engine: {c['engine']}", f"transformers: {c['hf']}", ""]
    if s := result.get("stack"):
        lines += ["## Whole stack over HTTP vs transformers (tiny checkpoint, CPU)", ""]
        lines += table(STACK_COLUMNS, [s]) if "error" not in s else [f"failed: {s['error']}"]
        lines += ["", "Stack: concurrent non-streamed chat completions (greedy) through gateway, decoder and Redis, "
                  "tokens from usage.completion_tokens. transformers: InternVLForConditionalGeneration.generate "
                  "in-process on the gateway's prompt ids, batched, stopping at the same stop tokens.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main

CPU_DEFAULTS = dict(shape="qwen2_5_0_5b", dtype="float32", streams=[1, 8], prompt_len=64, new_tokens=24,
                    ttft_tiles=2, ttft_streams=4, ttft_repeat=3, sampling_streams=8, sampling_prompt_len=512,
                    stack_requests=64, stack_max_tokens=64)
GPU_DEFAULTS = dict(shape="internlm2_5_7b", dtype="bfloat16", streams=[1, 16, 64], prompt_len=256, new_tokens=128,
                    ttft_tiles=13, ttft_streams=16, ttft_repeat=3, sampling_streams=64, sampling_prompt_len=1024,
                    stack_requests=64, stack_max_tokens=64)
SMOKE = dict(shape="tiny", dtype="float32", streams=[1, 2], prompt_len=32, new_tokens=AGREE_MIN, ttft_tiles=13,
             ttft_streams=2, ttft_repeat=1, sampling_streams=2, sampling_prompt_len=64, stack_requests=4,
             stack_max_tokens=16)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.decoder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the H200 run) or cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1-2 streams, 16 tokens, 4 stack requests")
    p.add_argument("--shape", choices=sorted(SHAPES), help="cuda: internlm2_5_7b; cpu: qwen2_5_0_5b")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cuda: bfloat16; cpu: float32")
    p.add_argument("--streams", type=int, nargs="+", help="stream counts (cuda: 1 16 64; cpu: 1 8)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens per stream (cuda: 256; cpu: 64)")
    p.add_argument("--new-tokens", type=int, help="greedy tokens per stream (cuda: 128; cpu: 24)")
    p.add_argument("--ttft-tiles", type=int, help="image tiles of the TTFT prompt, 256 tokens each (cuda: 13; cpu: 2)")
    p.add_argument("--ttft-streams", type=int, help="streams decoding while the image prompt arrives (cuda: 16)")
    p.add_argument("--ttft-decode-tokens", type=int, help="tokens of each of those streams (default: --new-tokens)")
    p.add_argument("--ttft-shared", type=int, default=4, help="questions about one image sent together (4)")
    p.add_argument("--ttft-repeat", type=int, help="TTFT-alone measurements, the median is reported (3; smoke: 1)")
    p.add_argument("--sampling-streams", type=int, help="streams of the decode steps by sampling settings (cuda: 64; "
                   "cpu: 8)")
    p.add_argument("--sampling-prompt-len", type=int, help="their prompt tokens (cuda: 1024; cpu: 512)")
    p.add_argument("--repeat", type=int, default=1,
                   help="measured runs per stream count (fresh prompts each); the median run is reported")
    p.add_argument("--hbm-bandwidth", type=float, default=4.8e12, help="B/s (H200: 4.8e12)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--max-running", type=int, help="default: enough for every stream")
    p.add_argument("--stack", action=argparse.BooleanOptionalAction,
                   help="the whole stack on the tiny checkpoint vs transformers (CPU; default on with --device cpu)")
    p.add_argument("--stack-requests", type=int, help="concurrent chat completions (64; smoke: 4)")
    p.add_argument("--stack-max-tokens", type=int, help="max_tokens of each (64; smoke: 16)")
    p.add_argument("--profile", type=int, nargs="*", default=[],
                   help="stream counts whose decode steps are profiled (kernel time vs wall, top kernels)")
    p.add_argument("--trace-compiles", action="store_true",
                   help="log every Triton kernel compile and torch.compile recompile with the time (a stall that is "
                   "a compile shows in the log beside the phase it fell in)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="markdown report, the JSON beside it "
                   "(default: bench/results/decoder-<device>-<date>.md)")
    args = p.parse_args()
    defaults = SMOKE if args.smoke else GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.ttft_decode_tokens = args.ttft_decode_tokens or args.new_tokens
    if args.stack is None:
        args.stack = not args.device.startswith("cuda")
    args.max_running = args.max_running or max(64, *args.streams, *args.profile, args.ttft_streams + 1,
                                               args.sampling_streams)
    if args.new_tokens < 2 or args.ttft_decode_tokens < 2:
        p.error("--new-tokens and --ttft-decode-tokens must be at least 2")
    if not args.out:
        tag = args.device.split(":")[0]
        args.out = str(ROOT / "bench" / "results" / f"decoder-{tag}-{datetime.date.today().isoformat()}.md")
    return args


def trace_compiles(log) -> None:
    torch._logging.set_logs(recompiles=True)
    import triton
    try:
        triton.knobs.runtime.jit_post_compile_hook = lambda **kw: log(f"Triton compiled {str(kw['repr'])[:240]}")
    except AttributeError:  # Triton without knobs (< 3.4): recompiles only
        log("this Triton has no compile hook: only torch.compile recompiles are logged")


def write(result: dict, out: Path) -> None:
    save(out, report(result), result)


def main() -> None:
    args = parse_args()
    shape, dtype = SHAPES[args.shape], getattr(torch, args.dtype)
    out = Path(args.out)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    torch.manual_seed(args.seed)
    if args.trace_compiles:
        trace_compiles(log)

    import transformers
    args.read_bandwidth = read_bandwidth(args.device) if args.device.startswith("cuda") else float("nan")
    log(f"building {args.shape} ({args.dtype}) on {args.device}")
    hf = build_transformers(shape, args.device, dtype, args.seed)
    ours = build_engine_model(shape, args.device, dtype)
    copy_weights(hf, ours)
    params = sum(p.numel() for p in ours.parameters())
    result = {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": args.device,
                       "device_name": device_name(args.device), "shape": args.shape, "dtype": args.dtype,
                       "command": shlex.join(["python", "-m", "bench.decoder", *sys.argv[1:]]),
                       "transformers": transformers.__version__, "params_m": params / 1e6,
                       "hbm_bandwidth": args.hbm_bandwidth, "read_bandwidth": args.read_bandwidth,
                       "args": vars(args)}}

    # KV blocks: room for the largest measurement, one spare block per sequence, and a margin.
    image_tokens = args.ttft_tiles * 256 + TEXT_AROUND_IMAGE
    need = max(max(args.streams) * (args.prompt_len + args.new_tokens),
               max(args.profile, default=0) * (args.prompt_len + 3 * PROFILE_STEPS + 4),
               args.ttft_streams * (args.prompt_len + args.ttft_decode_tokens) + image_tokens + 1,
               args.ttft_shared * (image_tokens + 1),
               args.sampling_streams * (args.sampling_prompt_len + args.new_tokens))
    seqs = max(max(args.streams), *args.profile, args.ttft_streams + 1, args.ttft_shared, args.sampling_streams)
    num_blocks = -(-need // args.block_size) + seqs + 16
    engine = make_engine(ours, num_blocks, args, dtype)
    bytes_per_step = weight_bytes_per_step(ours)

    result["throughput"] = []
    failed = False
    for streams in args.streams:
        log(f"throughput: {streams} streams x ({args.prompt_len} + {args.new_tokens}) tokens")
        row = throughput(hf, engine, shape, dtype, streams, args, bytes_per_step)
        result["throughput"].append(row)
        log(f"  engine {row['engine_tok_s']:.1f} tok/s, transformers {row['hf_tok_s']:.1f} tok/s, "
            f"ratio {row['ratio']:.2f}, agreement {row['agree_min']}")
        write(result, out)
    if one := next((r for r in result["throughput"] if r["streams"] == 1), None):
        need_agree = min(AGREE_MIN, args.new_tokens)
        strict = dtype == torch.float32  # on the GPU too: matmuls in IEEE fp32 (torch's default), attention too
        ok = one["agree_stream0"] >= need_agree
        failed = strict and not ok
        verdict = (f"required >= {need_agree} in fp32: {'pass' if ok else 'FAIL'}" if strict
                   else f"{args.dtype} on {args.device}: reported only")
        result["correctness"] = {"agree": one["agree_stream0"], "new_tokens": args.new_tokens, "verdict": verdict,
                                 "passed": ok or not strict, "engine": one["engine_first_tokens"],
                                 "hf": one["hf_first_tokens"]}
    del hf
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    for streams in args.profile:
        log(f"profile: decode steps at {streams} streams")
        result.setdefault("profile", []).append(decode_profile(engine, shape, streams, args))
        write(result, out)

    log(f"TTFT: {args.ttft_tiles}-tile image prompt, alone and with {args.ttft_streams} decoding streams")
    result["ttft"] = ttft(engine, shape, dtype, args)
    write(result, out)
    log(f"sampling: {args.sampling_streams} streams x ({args.sampling_prompt_len} + {args.new_tokens}) tokens, "
        f"{len(SAMPLING_SETTINGS)} settings")
    result["sampling"] = sampling(engine, shape, args)
    write(result, out)
    del engine, ours
    gc.collect()

    if args.stack:
        log(f"stack: {args.stack_requests} concurrent requests, max_tokens {args.stack_max_tokens}")
        with tempfile.TemporaryDirectory(prefix="bench-decoder-") as tmp:
            try:
                result["stack"] = run_stack(args, Path(tmp))
            except Exception as e:  # the engine-vs-transformers numbers above stand on their own
                result["stack"] = {"error": f"{type(e).__name__}: {e}"[:300]}
                failed = True
        write(result, out)

    print(report(result))
    print(f"written to {out}" + ("" if out.suffix == ".json" else f" and {out.with_suffix('.json')}"),
          file=sys.stderr)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
