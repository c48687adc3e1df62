"""Vision encoder service: `python -m services.vision_encoder --model DIR_OR_HUB_ID`."""
import argparse
import logging

from internvl.serving.v1 import serving_pb2 as pb
from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from services.common import settings, weights
from services.common.cache import EmbeddingCache
from services.common.checkpoint import checkpoint_id
from services.common.grpc_utils import add_server_args, serve, server_credentials
from services.vision_encoder.encoder import TileBatcher, VisionRunner, load_vision_model
from services.vision_encoder.server import VisionEncoderServicer

log = logging.getLogger("vision_encoder")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.vision_encoder", description=__doc__)
    weights.add_model_args(p)
    settings.add(p, "--port", "VISION_PORT", 50051, "gRPC port", int)
    add_server_args(p)
    settings.add(p, "--metrics-port", "VISION_METRICS_PORT", 9101, "Prometheus /metrics port (0 = off)", int)
    settings.add(p, "--redis-url", "REDIS_URL", None, "Redis for the embedding cache (unset = no cache)")
    settings.add(p, "--cache-ttl", "CACHE_TTL_S", 3600, "seconds an image's embeddings stay cached", int)
    settings.add(p, "--max-batch-tiles", "VISION_MAX_BATCH_TILES", 64, "most tiles in one forward pass", int)
    settings.add(p, "--cuda-graph-tiles", "VISION_CUDA_GRAPH_TILES", 0,
                 "batches of up to this many tiles replay CUDA graphs captured at start-up (0 = eager)", int)
    settings.add(p, "--compile", "VISION_COMPILE", "", "a torch.compile backend to run the model through "
                 "(inductor; empty = eager); on the GPU it compiles at start-up, before serving")
    settings.add(p, "--max-wait-ms", "VISION_MAX_WAIT_MS", 5.0,
                 "how long a batch waits for more tiles while another batch runs (none on an idle device)", float)
    settings.add(p, "--max-queued-tiles", "VISION_MAX_QUEUED_TILES", 4096,
                 "tiles that may wait for the GPU; more are refused with RESOURCE_EXHAUSTED (the gateway's 429)", int)
    return p.parse_args()


async def main() -> None:
    args = parse_args()
    credentials = server_credentials(args)  # bad TLS settings stop the service before the model loads
    path, cfg, dtype = weights.open_checkpoint(args, parts=("vision",))
    model = load_vision_model(cfg, path, args.device, dtype)
    checkpoint = checkpoint_id(path)
    info = pb.ModelInfo(model=args.model, checkpoint=checkpoint,
                        fingerprint=weights.weights_fingerprint(model, checkpoint), dtype=str(dtype).removeprefix("torch."), hidden_size=cfg.text.hidden_size,
                        tokens_per_tile=cfg.tokens_per_tile)
    runner = VisionRunner(model, args.device, args.max_batch_tiles, args.cuda_graph_tiles, args.compile)
    batcher = TileBatcher(runner, args.max_wait_ms / 1000)
    batcher.start()
    cache = EmbeddingCache(args.redis_url, args.cache_ttl)
    servicer = VisionEncoderServicer(cfg, batcher, cache, info, max_queued_tiles=args.max_queued_tiles)
    log.info("vision encoder serving %s on :%d", args.model, args.port)
    await serve(lambda server: pb_grpc.add_VisionEncoderServicer_to_server(servicer, server),
                "internvl.serving.v1.VisionEncoder", args.port, args.metrics_port,
                credentials, args.health_port, args.host)
    await cache.close()


if __name__ == "__main__":
    settings.run(main)
