"""Gateway: `python -m services.gateway --model DIR_OR_HUB_ID --vision-addr HOST:PORT --decoder-addr HOST:PORT`.

Serves the OpenAI-compatible REST API and the public gRPC API; needs no GPU and no model weights.
"""
import argparse
import asyncio
import logging
from pathlib import Path

import httpx
import uvicorn

from internvl.serving.v1 import serving_pb2 as pb
from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from services.common import settings
from services.common.cache import EmbeddingCache
from services.common.checkpoint import read_model_config, resolve_checkpoint
from services.common.grpc_utils import add_health, create_channel, create_server, set_serving
from services.gateway.chat import ChatService, Limits, Pools
from services.gateway.grpc_api import GatewayServicer
from services.gateway.http_api import create_app
from services.gateway.prompt import PromptBuilder

log = logging.getLogger("gateway")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.gateway", description=__doc__)
    settings.add(p, "--model", "MODEL", None, "hub id or local checkpoint directory (tokenizer and config only)")
    settings.add(p, "--served-model-name", "SERVED_MODEL_NAME", None,
                 "name clients use in `model` (default: the directory name, or the hub id)")
    settings.add(p, "--host", "GATEWAY_HOST", "0.0.0.0", "address to listen on")
    settings.add(p, "--port", "GATEWAY_PORT", 8000, "REST port", int)
    settings.add(p, "--grpc-port", "GATEWAY_GRPC_PORT", 50050, "public gRPC port", int)
    settings.add(p, "--vision-addr", "VISION_ADDR", "localhost:50051", "vision encoder pool (host:port)")
    settings.add(p, "--decoder-addr", "DECODER_ADDR", "localhost:50052", "LLM decoder pool (host:port)")
    settings.add(p, "--redis-url", "REDIS_URL", None, "Redis for the embedding cache (unset = no cache)")
    settings.add(p, "--cache-namespace", "CACHE_NAMESPACE", "ivl:emb", "prefix of the cache keys in Redis")
    settings.add(p, "--max-num", "MAX_NUM", 12, "most tiles per image a request may ask for", int)
    settings.add(p, "--max-images", "MAX_IMAGES", 16, "most images per request", int)
    settings.add(p, "--max-image-bytes", "MAX_IMAGE_BYTES", 20 * 1024 * 1024, "largest encoded image", int)
    settings.add(p, "--pool-wait", "POOL_WAIT_S", 300.0, "seconds to wait for the pools at start-up", float)
    return p.parse_args()


async def pool_info(stub, name: str, wait_s: float) -> pb.ModelInfo:
    """Ask a pool what it serves, waiting while it loads."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        try:
            return await stub.Info(pb.InfoRequest(), timeout=5, wait_for_ready=True)
        except Exception as e:
            if loop.time() > deadline:
                raise SystemExit(f"{name} not reachable after {wait_s:.0f}s: {e}")
            await asyncio.sleep(0.5)


async def main() -> None:
    args = parse_args()
    settings.setup_logging()
    if not args.model:
        raise SystemExit("--model (or MODEL) is required")
    path = resolve_checkpoint(args.model, parts=())  # config and tokenizer only
    cfg = read_model_config(path)
    vision = pb_grpc.VisionEncoderStub(create_channel(args.vision_addr))
    decoder = pb_grpc.LlmDecoderStub(create_channel(args.decoder_addr))
    vision_info, decoder_info = await asyncio.gather(pool_info(vision, "vision encoder", args.pool_wait),
                                                     pool_info(decoder, "LLM decoder", args.pool_wait))
    if vision_info.checkpoint != decoder_info.checkpoint:
        raise SystemExit(f"the pools serve different checkpoints: vision {vision_info.model} "
                         f"({vision_info.checkpoint}) vs decoder {decoder_info.model} ({decoder_info.checkpoint})")
    if vision_info.tokens_per_tile != cfg.tokens_per_tile:
        raise SystemExit(f"{args.model} has {cfg.tokens_per_tile} tokens per tile, the vision pool "
                         f"{vision_info.tokens_per_tile}: the gateway's MODEL is not the pools' checkpoint")
    prompt = PromptBuilder(path, cfg)
    name = args.served_model_name or (Path(args.model).name if Path(args.model).is_dir() else args.model)
    limits = Limits(default_max_num=min(cfg.max_dynamic_patch, args.max_num), max_num=args.max_num,
                    max_images=args.max_images, max_image_bytes=args.max_image_bytes)
    cache = EmbeddingCache(args.redis_url, ttl_s=0)  # the gateway only reads; the vision pool writes
    async with httpx.AsyncClient(follow_redirects=True) as http:
        pools = Pools(vision, decoder, vision_info.fingerprint, vision_info.tokens_per_tile, decoder_info.max_model_len)
        chat = ChatService(name, prompt, pools, cache, http, limits, tile_size=cfg.vision.image_size,
                           use_thumbnail=cfg.use_thumbnail, cache_namespace=args.cache_namespace)
        grpc_server = create_server()
        pb_grpc.add_GatewayServicer_to_server(GatewayServicer(chat), grpc_server)
        health = add_health(grpc_server, "internvl.serving.v1.Gateway")
        grpc_server.add_insecure_port(f"[::]:{args.grpc_port}")
        await grpc_server.start()
        await set_serving(health, "internvl.serving.v1.Gateway")
        log.info("gateway serving %s: REST http://%s:%d, gRPC :%d", name, args.host, args.port, args.grpc_port)
        # uvicorn owns SIGINT/SIGTERM: when it returns, the gRPC side stops too.
        await uvicorn.Server(uvicorn.Config(create_app(chat), host=args.host, port=args.port,
                                            log_level="warning")).serve()
        await grpc_server.stop(5)
    await cache.close()


if __name__ == "__main__":
    settings.run(main)
