"""gRPC server and channel set-up shared by the services."""
import asyncio
import os
import signal
from typing import Callable, Sequence

import grpc
from prometheus_client import start_http_server
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

# Embeddings of the largest request (8B, 13 tiles, bf16) are ~27 MB; leave room for many images.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def create_server() -> grpc.aio.Server:
    return grpc.aio.server(options=OPTIONS)


def create_channel(target: str, options: Sequence[tuple[str, int]] = ()) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=[*OPTIONS, *options])


def add_health(server: grpc.aio.Server, service_name: str) -> health.aio.HealthServicer:
    """Register the standard health service (NOT_SERVING until `set_serving`) and reflection, so that tools such
    as grpcurl and grpc_health_probe work against every server."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection([service_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return servicer


async def set_serving(servicer: health.aio.HealthServicer, *service_names: str) -> None:
    for name in ("", *service_names):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


async def serve(add_servicer: Callable[[grpc.aio.Server], None], service_name: str, port: int,
                metrics_port: int) -> None:
    """Serve one service (plus health, and Prometheus metrics unless the port is 0) until SIGINT/SIGTERM, then
    shut down gracefully (see `serve_until_signal`)."""
    server = create_server()
    add_servicer(server)
    health = add_health(server, service_name)
    server.add_insecure_port(f"[::]:{port}")
    await server.start()
    if metrics_port:
        start_http_server(metrics_port)
    await set_serving(health, service_name)
    await serve_until_signal(server, health)


async def serve_until_signal(server: grpc.aio.Server, health: health.aio.HealthServicer | None = None) -> None:
    """Run a started server until SIGINT/SIGTERM. Then: report NOT_SERVING (readiness fails, balancers stop sending),
    keep serving for SHUTDOWN_DELAY_S while that spreads, stop taking calls and give the ones in flight (streams
    included) SHUTDOWN_GRACE_S to finish."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if health is not None:
        await health.enter_graceful_shutdown()
    await asyncio.sleep(float(os.environ.get("SHUTDOWN_DELAY_S", "0")))
    await server.stop(float(os.environ.get("SHUTDOWN_GRACE_S", "30")))
