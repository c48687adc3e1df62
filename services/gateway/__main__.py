"""Gateway: `python -m services.gateway --model DIR_OR_HUB_ID --vision-addr HOST:PORT --decoder-addr HOST:PORT`.

Serves the OpenAI-compatible REST API and the public gRPC API; needs no GPU and no model weights. Calls to each pool
are spread over its endpoints (pods): from the Service's EndpointSlices when --vision-service/--decoder-service are
set, else from the address lists (several `host:port`, or `dns:///name:port` re-resolved, e.g. a headless Service).
"""
import argparse
import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

import httpx
import uvicorn

from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from services.common import settings
from services.common.cache import EmbeddingCache
from services.common.checkpoint import checkpoint_id, read_model_config, resolve_checkpoint
from services.common.grpc_utils import (add_health, channel_credentials, create_server, listen_address, set_serving,
                                        shutdown_times, start_metrics_server, stop_signal)
from services.gateway.auth import read_api_keys
from services.gateway.balancer import (Balancer, kube_api_client, parse_addresses, pod_namespace, watch_addresses,
                                       watch_endpoint_slices)
from services.gateway.chat import ChatService, Limits
from services.gateway.grpc_api import GatewayServicer
from services.gateway.http_api import create_app
from services.gateway.malloc import return_large_buffers
from services.gateway.media import UrlPolicy
from services.gateway.pools import Pools, same_checkpoint
from services.gateway.preprocess import Preprocessor
from services.gateway.prompt import PromptBuilder, sampling_defaults
from services.gateway.video import DEFAULT_NUM_SEGMENTS

log = logging.getLogger("gateway")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.gateway", description=__doc__)
    settings.add(p, "--model", "MODEL", None, "hub id or local checkpoint directory (tokenizer and config only)")
    settings.add(p, "--served-model-name", "SERVED_MODEL_NAME", None,
                 "name clients use in `model` (default: the directory name, or the hub id)")
    settings.add(p, "--host", "GATEWAY_HOST", "0.0.0.0",
                 "address the REST, gRPC and metrics ports listen on (0.0.0.0: every address; gRPC on IPv6 too)")
    settings.add(p, "--port", "GATEWAY_PORT", 8000, "REST port", int)
    settings.add(p, "--grpc-port", "GATEWAY_GRPC_PORT", 50050, "public gRPC port", int)
    settings.add(p, "--keep-alive", "GATEWAY_KEEP_ALIVE_S", 75.0,
                 "seconds an idle client connection stays open: longer than clients and balancers keep theirs (httpx "
                 "and the openai client: 5 s; cloud load balancers: 60 s), so that they close first and never send a "
                 "request on a connection this server is closing (uvicorn's 5 s races httpx's 5 s)", float)
    settings.add(p, "--metrics-port", "GATEWAY_METRICS_PORT", 0,
                 "a separate port for Prometheus /metrics (0 = only /metrics on the REST port)", int)
    settings.add(p, "--vision-addr", "VISION_ADDR", "localhost:50051",
                 "vision encoder pool: host:port, comma-separated for several, dns:///name:port for each address "
                 "of a name (re-resolved)")
    settings.add(p, "--decoder-addr", "DECODER_ADDR", "localhost:50052", "LLM decoder pool (as --vision-addr)")
    settings.add(p, "--vision-service", "VISION_SERVICE", None,
                 "Kubernetes Service of the vision pool: its ready pods from the EndpointSlices (instead of the "
                 "address; needs `list`/`watch` on endpointslices)")
    settings.add(p, "--decoder-service", "DECODER_SERVICE", None, "Kubernetes Service of the decoder pool")
    settings.add(p, "--dns-refresh", "DNS_REFRESH_S", 5.0, "seconds between re-resolutions of dns:/// names", float)
    settings.add(p, "--eject", "EJECT_S", 10.0,
                 "seconds an unreachable endpoint gets no calls (doubled each time in a row)", float)
    settings.add(p, "--pool-tls-ca", "POOL_TLS_CA", None,
                 "PEM CA bundle the pools' certificates are checked against (set: calls to the pools use TLS)")
    settings.add(p, "--pool-tls-cert", "POOL_TLS_CERT", None,
                 "PEM client certificate presented to the pools (mTLS; with --pool-tls-key)")
    settings.add(p, "--pool-tls-key", "POOL_TLS_KEY", None, "PEM private key of --pool-tls-cert")
    settings.add(p, "--pool-tls-server-name", "POOL_TLS_SERVER_NAME", None,
                 "name the pools' certificates are checked for (pods are called by IP; default: the address)")
    settings.add(p, "--redis-url", "REDIS_URL", None, "Redis for the embedding cache (unset = no cache)")
    settings.add(p, "--cache-namespace", "CACHE_NAMESPACE", "ivl:emb", "prefix of the cache keys in Redis")
    settings.add(p, "--max-num", "MAX_NUM", 12, "most tiles per image a request may ask for", int)
    settings.add(p, "--max-images", "MAX_IMAGES", 16, "most images per request", int)
    settings.add(p, "--max-n", "MAX_N", 8, "most answers (n) per request", int)
    settings.add(p, "--generation-config", "GENERATION_CONFIG", "auto",
                 "auto: a request's unset temperature, top_p, top_k, min_p, repetition_penalty and max_tokens come "
                 "from the checkpoint's generation_config.json (as vLLM); none: OpenAI's defaults",
                 choices=("auto", "none"))
    settings.add(p, "--max-image-bytes", "MAX_IMAGE_BYTES", 20 * 1024 * 1024, "largest encoded image", int)
    settings.add(p, "--max-videos", "MAX_VIDEOS", 4, "most videos per request", int)
    settings.add(p, "--max-num-segments", "MAX_NUM_SEGMENTS", 32,
                 "most frames a request may sample from a video (num_segments; default 8, or this if lower)", int)
    settings.add(p, "--max-video-bytes", "MAX_VIDEO_BYTES", 64 * 1024 * 1024, "largest encoded video", int)
    settings.add(p, "--max-video-frames", "MAX_VIDEO_FRAMES", 100_000, "most frames in a video's container", int)
    settings.add(p, "--max-video-pixels", "MAX_VIDEO_PIXELS", 3840 * 2160, "largest video frame, in pixels", int)
    settings.add(p, "--max-concurrent-requests", "MAX_CONCURRENT_REQUESTS", 256,
                 "chat requests served at once (REST and gRPC); more are refused with 429 / RESOURCE_EXHAUSTED", int)
    settings.add(p, "--generate-timeout", "GENERATE_TIMEOUT_S", 3600.0,
                 "deadline of a whole generation on the decoder (its stream included)", float)
    settings.add(p, "--single-flight-ttl", "SINGLE_FLIGHT_TTL_S", 15.0,
                 "an image another gateway is encoding is waited for (its claim in Redis) at most this long", float)
    settings.add(p, "--max-decode-pixels", "MAX_DECODE_PIXELS", 256 * 1024 * 1024,
                 "decoded image pixels in flight over all requests (bounds the gateway's memory)", int)
    settings.add(p, "--preprocess-workers", "PREPROCESS_WORKERS", 0,
                 "processes that decode and tile images and videos (0: one per CPU the gateway may use: its "
                 "affinity and cgroup CPU limit)", int)
    settings.add(p, "--api-keys", "API_KEYS", "",
                 "comma-separated API keys clients must send as `Authorization: Bearer <key>` (empty: open)")
    settings.add(p, "--api-keys-file", "API_KEYS_FILE", None, "a file of API keys, one per line (e.g. a mounted Secret)")
    settings.add(p, "--max-request-bytes", "MAX_REQUEST_BYTES", 64 * 1024 * 1024,
                 "largest chat request body (inline images included); larger ones get a 413", int)
    settings.add(p, "--pool-wait", "POOL_WAIT_S", 300.0,
                 "seconds to wait for the pools (at start-up; per request when they are not up)", float)
    settings.add(p, "--wait-for-pools", "WAIT_FOR_POOLS", 1,
                 "1: start serving once the pools answer; 0: serve at once and let requests wait for the pools "
                 "(pools that scale to zero)", int)
    settings.add(p, "--image-url-allow", "IMAGE_URL_ALLOW", "",
                 "networks and host names image URLs may reach besides public addresses, comma-separated "
                 "(e.g. 10.2.0.0/16,images.internal); by default loopback, private, link-local and other "
                 "non-public addresses are refused")
    return p.parse_args()


def pool(name: str, stub_class, addr: str, service: str | None, kube, args: argparse.Namespace,
         checkpoint: str) -> Balancer:
    """A pool's balancer: its endpoints get calls once they report the gateway's checkpoint."""
    balancer = Balancer(name, stub_class, eject_s=args.eject, wait_s=0.0 if args.wait_for_pools else args.pool_wait,
                        check=same_checkpoint(checkpoint), server_name=args.pool_tls_server_name,
                        credentials=channel_credentials(args.pool_tls_ca, args.pool_tls_cert, args.pool_tls_key))
    if service:
        namespace = pod_namespace()
        log.info("%s pool: endpoints of Service %s/%s", name, namespace, service)
        return balancer.start(lambda update: watch_endpoint_slices(kube, namespace, service, update))
    try:
        parse_addresses(addr)  # a bad list stops the gateway now, not after --pool-wait
    except ValueError as e:
        raise SystemExit(f"{name} pool address: {e}")
    return balancer.start(lambda update: watch_addresses(addr, update, interval_s=args.dns_refresh))


async def check_pools(vision: Balancer, decoder: Balancer, cfg, args, wait_s: float | None = None) -> Pools:
    """The pools, once every endpoint they have reported its facts (the first requests spread over all of them), or
    after `wait_s` once each pool has an endpoint in rotation (one that serves the gateway's checkpoint)."""
    wait_s = args.pool_wait if wait_s is None else wait_s
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while any(pool.unchecked() or not pool.endpoints for pool in (vision, decoder)) and loop.time() < deadline:
        await asyncio.sleep(0.1)
    if not (vision.endpoints and decoder.endpoints):
        refused = "; ".join(f"{addr}: {why}" for pool in (vision, decoder) for addr, why in pool.refused().items())
        raise SystemExit(f"the pools have no endpoint serving {args.model} after {wait_s:.0f}s"
                         + (f" ({refused})" if refused else ""))
    pools = Pools(vision, decoder, tokens_per_tile=cfg.tokens_per_tile)
    log.info("pools up: %d vision, %d decoder endpoints; vision weights %s", len(vision.endpoints),
             len(decoder.endpoints), pools.fingerprint)
    return pools


class RestServer(uvicorn.Server):
    """uvicorn without its own signal handling: it re-raises the signal once it has stopped, which would kill the
    gateway before its gRPC side drains and its pools close. `main` handles the signals and sets `should_exit`."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def stop_on_failure(task: asyncio.Future) -> None:
    """A background pool check that failed stops the gateway, as it would have at start-up."""
    if not task.cancelled() and task.exception():
        log.error("stopping: %s", task.exception())
        os.kill(os.getpid(), signal.SIGTERM)


async def main() -> None:
    args = parse_args()
    settings.setup_logging()
    return_large_buffers()
    if not args.model:
        raise SystemExit("--model (or MODEL) is required")
    path = resolve_checkpoint(args.model, parts=())  # config and tokenizer only
    cfg = read_model_config(path)
    checkpoint = checkpoint_id(path)
    try:
        kube = await kube_api_client() if args.vision_service or args.decoder_service else None
    except Exception as e:
        raise SystemExit(f"--vision-service/--decoder-service need the Kubernetes API (in-cluster or KUBECONFIG): {e}")
    vision = pool("vision encoder", pb_grpc.VisionEncoderStub, args.vision_addr, args.vision_service, kube, args,
                  checkpoint)
    decoder = pool("LLM decoder", pb_grpc.LlmDecoderStub, args.decoder_addr, args.decoder_service, kube, args,
                   checkpoint)
    if args.wait_for_pools:
        pools = await check_pools(vision, decoder, cfg, args)
    else:  # serve at once (pools that scale to zero come up on demand); requests wait for them
        pools = asyncio.ensure_future(check_pools(vision, decoder, cfg, args, wait_s=float("inf")))
        pools.add_done_callback(stop_on_failure)
    prompt = PromptBuilder(path, cfg)
    name = args.served_model_name or (Path(args.model).name if Path(args.model).is_dir() else args.model)
    limits = Limits(default_max_num=min(cfg.max_dynamic_patch, args.max_num), max_num=args.max_num,
                    max_images=args.max_images, max_n=args.max_n, max_image_bytes=args.max_image_bytes,
                    default_num_segments=min(DEFAULT_NUM_SEGMENTS, args.max_num_segments),
                    max_num_segments=args.max_num_segments, max_videos=args.max_videos,
                    max_video_bytes=args.max_video_bytes, max_video_frames=args.max_video_frames,
                    max_video_pixels=args.max_video_pixels,
                    url_policy=UrlPolicy.parse(args.image_url_allow), pool_wait_s=args.pool_wait,
                    max_concurrent_requests=args.max_concurrent_requests, max_request_bytes=args.max_request_bytes,
                    max_decode_pixels=args.max_decode_pixels, generate_timeout_s=args.generate_timeout,
                    single_flight_ttl_s=args.single_flight_ttl,
                    api_keys=tuple(read_api_keys(args.api_keys, args.api_keys_file)),
                    sampling_defaults=sampling_defaults(path) if args.generation_config == "auto" else {})
    if limits.sampling_defaults:  # as vLLM says it: answers differ from OpenAI's defaults
        log.warning("sampling defaults from the checkpoint's generation_config.json: %s (--generation-config none: "
                    "OpenAI's)", limits.sampling_defaults)
    cache = EmbeddingCache(args.redis_url, ttl_s=0)  # the gateway only reads; the vision pool writes
    preprocess = Preprocessor(args.preprocess_workers)
    await preprocess.start()  # the workers' imports before traffic, not on the first images
    log.info("preprocessing: %d worker processes", preprocess.workers)
    async with httpx.AsyncClient() as http:  # redirects are followed by fetch_image, each hop checked
        chat = ChatService(name, prompt, pools, cache, http, limits, tile_size=cfg.vision.image_size,
                           use_thumbnail=cfg.use_thumbnail, cache_namespace=args.cache_namespace,
                           preprocess=preprocess)
        if args.metrics_port:
            start_metrics_server(args.host, args.metrics_port)
        grpc_server = create_server()
        pb_grpc.add_GatewayServicer_to_server(GatewayServicer(chat), grpc_server)
        health = add_health(grpc_server, "internvl.serving.v1.Gateway")
        grpc_server.add_insecure_port(listen_address(args.host, args.grpc_port))
        await grpc_server.start()
        await set_serving(health, "internvl.serving.v1.Gateway")
        log.info("gateway serving %s: REST http://%s:%d, gRPC :%d", name, args.host, args.port, args.grpc_port)
        delay, grace = shutdown_times()
        rest = RestServer(uvicorn.Config(create_app(chat), host=args.host, port=args.port, log_level="warning",
                                         timeout_keep_alive=args.keep_alive,
                                         timeout_graceful_shutdown=grace))
        serving, stopping = asyncio.ensure_future(rest.serve()), asyncio.ensure_future(stop_signal())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        # As the pools do: not ready (REST 503, gRPC NOT_SERVING) but still serving while balancers notice, then no
        # new requests on either API and the ones in flight (streams included) get the grace period.
        log.info("stopping: not ready, serving %.0f s more, then %.0f s for the requests in flight", delay, grace)
        chat.stopping = True
        await health.enter_graceful_shutdown()
        await asyncio.sleep(delay)
        rest.should_exit = True
        await asyncio.gather(serving, grpc_server.stop(grace))
    await asyncio.gather(vision.close(), decoder.close(), cache.close(), asyncio.to_thread(preprocess.close))
    if kube:
        await kube.close()


if __name__ == "__main__":
    settings.run(main)
