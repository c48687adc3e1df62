"""LLM decoder service: `python -m services.llm_decoder --model DIR_OR_HUB_ID`."""
import argparse
import logging

import torch
from prometheus_client import REGISTRY, Gauge

from internvl.serving.v1 import serving_pb2 as pb
from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from services.common import settings, weights
from services.common.cache import EmbeddingCache
from services.common.checkpoint import checkpoint_id
from services.common.grpc_utils import add_server_args, serve, server_credentials
from services.common.tokenizer import load_tokenizer
from services.llm_decoder.engine.llm_engine import LLMEngine
from services.llm_decoder.engine.model_runner import profile_prefill_memory
from services.llm_decoder.models import load_language_model
from services.llm_decoder.server import EngineCollector, LlmDecoderServicer

log = logging.getLogger("llm_decoder")
GPU_MEMORY = Gauge("decoder_gpu_memory_bytes", "GPU memory held by torch's allocator (reserved; 0 on CPU)")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.llm_decoder", description=__doc__)
    weights.add_model_args(p)
    settings.add(p, "--port", "DECODER_PORT", 50052, "gRPC port", int)
    add_server_args(p)
    settings.add(p, "--metrics-port", "DECODER_METRICS_PORT", 9102, "Prometheus /metrics port (0 = off)", int)
    settings.add(p, "--max-model-len", "MAX_MODEL_LEN", 0, "longest prompt + completion (0 = the model's)", int)
    settings.add(p, "--kv-cache-tokens", "KV_CACHE_TOKENS", 0,
                 "KV cache size in tokens (0 = the GPU memory budget less the weights and the largest prefill step, "
                 "or 4 contexts on CPU)", int)
    settings.add(p, "--gpu-memory-utilization", "GPU_MEMORY_UTILIZATION", 0.9,
                 "share of GPU memory the weights and KV cache may use", float)
    settings.add(p, "--block-size", "KV_BLOCK_SIZE", 16, "tokens per KV block", int)
    settings.add(p, "--max-batched-tokens", "MAX_BATCHED_TOKENS", 8192,
                 "tokens per step (decodes and prefill chunks together): longer prompts are prefilled in chunks", int)
    settings.add(p, "--max-running", "MAX_RUNNING", 64, "sequences decoded together", int)
    settings.add(p, "--cuda-graphs", "CUDA_GRAPHS", 1, "replay decode steps from CUDA graphs (0 = eager)", int)
    settings.add(p, "--overlap", "OVERLAP_STEPS", 1,
                 "on CUDA, queue each step before reading back the one before it, so the host's work per step runs "
                 "while the GPU computes (0 = off)", int)
    settings.add(p, "--redis-url", "REDIS_URL", None,
                 "Redis of the embedding cache: image embeddings the gateway names by key are read from it (unset = "
                 "they travel inline)")
    settings.add(p, "--recent-images-mb", "DECODER_RECENT_IMAGES_MB", 1024,
                 "host memory (MiB) for the embeddings of images this decoder read from the cache lately: another "
                 "request about one of them takes its rows from there, not from Redis (0 = off)", int)
    settings.add(p, "--max-waiting", "MAX_WAITING", 1024,
                 "requests that may wait for admission; more are refused with RESOURCE_EXHAUSTED (the gateway's 429)",
                 int)
    args = p.parse_args()
    if args.max_batched_tokens < args.max_running:
        p.error("--max-batched-tokens must be at least --max-running: every running sequence decodes each step")
    return args


def kv_blocks(args, model: torch.nn.Module, max_model_len: int, dtype: torch.dtype) -> int:
    """The KV budget in blocks: as asked; else, on a GPU, the memory budget less the weights and the activations of
    the largest prefill step (measured by running one); else room for four full contexts."""
    attn = model.kv_layers()
    bytes_per_token = 2 * len(attn) * attn[0].kv_heads * attn[0].head_dim * dtype.itemsize
    tokens = args.kv_cache_tokens
    if not tokens and args.device.startswith("cuda"):
        peak = profile_prefill_memory(model, args.max_batched_tokens, args.block_size, args.max_running, args.device,
                                      dtype)
        total = torch.cuda.get_device_properties(args.device).total_memory
        tokens = int((total * args.gpu_memory_utilization - peak) // bytes_per_token)
        log.info("KV budget: %.1f GiB of %.1f GiB (weights + largest prefill step: %.1f GiB)",
                 tokens * bytes_per_token / 2 ** 30, total / 2 ** 30, peak / 2 ** 30)
    blocks = (tokens or 4 * max_model_len) // args.block_size
    if blocks * args.block_size < max_model_len:  # whole blocks: the last partial one is not usable
        raise SystemExit(f"KV cache of {blocks * args.block_size} tokens cannot hold one {max_model_len}-token "
                         "context; lower --max-model-len or raise the KV budget")
    return blocks


async def main() -> None:
    args = parse_args()
    credentials = server_credentials(args)  # bad TLS settings stop the service before the model loads
    path, cfg, dtype = weights.open_checkpoint(args, parts=("text",))
    model = load_language_model(cfg, path, args.device, dtype)
    max_model_len = args.max_model_len or cfg.text.max_position_embeddings
    num_blocks = kv_blocks(args, model, max_model_len, dtype)
    engine = LLMEngine(model, num_blocks=num_blocks, block_size=args.block_size,
                       max_batched_tokens=args.max_batched_tokens, max_running=args.max_running,
                       device=args.device, dtype=dtype, max_model_len=max_model_len,
                       cuda_graphs=bool(args.cuda_graphs), overlap=None if args.overlap else False)
    if args.device.startswith("cuda"):  # on the CPU nothing compiles on first use
        engine.warm_up(cfg.text.vocab_size)
    tokenizer = load_tokenizer(path).backend_tokenizer
    checkpoint = checkpoint_id(path)
    info = pb.ModelInfo(model=args.model, checkpoint=checkpoint,
                        fingerprint=weights.weights_fingerprint(model, checkpoint),
                        dtype=str(dtype).removeprefix("torch."), hidden_size=cfg.text.hidden_size,
                        tokens_per_tile=cfg.tokens_per_tile, max_model_len=max_model_len,
                        reads_cache=bool(args.redis_url))
    # Reads only: its TTL is the writer's (the vision pool's) business.
    cache = EmbeddingCache(args.redis_url, ttl_s=0) if args.redis_url else None
    servicer = LlmDecoderServicer(engine, tokenizer, cfg.image_token_id, cfg.text.vocab_size, cfg.text.hidden_size,
                                  max_model_len, dtype, info, max_waiting=args.max_waiting, cache=cache,
                                  recent_bytes=args.recent_images_mb << 20)
    engine.start()
    REGISTRY.register(EngineCollector(engine, args.model))
    if args.device.startswith("cuda"):  # read at scrape time: weights, KV cache and the peak activations so far
        GPU_MEMORY.set_function(lambda: torch.cuda.memory_reserved(args.device))
    log.info("LLM decoder serving %s on :%d (KV cache: %d blocks of %d tokens)", args.model, args.port, num_blocks,
             args.block_size)
    await serve(lambda server: pb_grpc.add_LlmDecoderServicer_to_server(servicer, server),
                "internvl.serving.v1.LlmDecoder", args.port, args.metrics_port,
                credentials, args.health_port, args.host)
    if cache is not None:
        await cache.close()


if __name__ == "__main__":
    settings.run(main)
