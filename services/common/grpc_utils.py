"""gRPC server and channel set-up shared by the services, with optional mTLS between the gateway and the pools."""
import argparse
import asyncio
import inspect
import os
import signal
from pathlib import Path
from typing import Callable, Sequence

import grpc
from prometheus_client import start_http_server
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import settings

# Embeddings of the largest request (8B, 13 tiles, bf16) are ~27 MB; leave room for many images.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class _Undecodable:
    """What a request's bytes that do not parse as the method's message are handed on as."""

    def __init__(self, error: Exception):
        self.error = error


class _RefuseUndecodable(grpc.aio.ServerInterceptor):
    """A request whose bytes are not the method's message is INVALID_ARGUMENT, as any other bad input (grpcio answers
    UNKNOWN when a deserializer raises)."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        behavior = getattr(handler, kind)
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler
        parse = handler.request_deserializer

        def deserialize(data: bytes):
            try:
                return parse(data)
            except Exception as e:  # protobuf's DecodeError, or a string field that is not UTF-8
                return _Undecodable(e)

        async def check(request, context):
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the request is not a valid {details.method} message: {request.error}")

        if inspect.isasyncgenfunction(behavior):
            async def checked(request, context):
                await check(request, context)
                async for response in behavior(request, context):
                    yield response
        else:
            async def checked(request, context):
                await check(request, context)
                return await behavior(request, context)
        return handler._replace(request_deserializer=deserialize, **{kind: checked})


def create_server() -> grpc.aio.Server:
    return grpc.aio.server(options=OPTIONS, interceptors=[_RefuseUndecodable()])


def create_channel(target: str, options: Sequence[tuple[str, int]] = (),
                   credentials: grpc.ChannelCredentials | None = None, server_name: str | None = None
                   ) -> grpc.aio.Channel:
    """A channel to `target`; over TLS with `credentials`, checking the server's certificate for `server_name` when
    given (pods are called by IP: their certificates may name the Service instead)."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=[*OPTIONS, *options])
    name = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.aio.secure_channel(target, credentials, options=[*OPTIONS, *options, *name])


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """A pool's listening settings: the address, and TLS (off unless a certificate is given)."""
    settings.add(parser, "--host", "LISTEN_HOST", "",
                 "address the gRPC, health and metrics ports listen on (empty: every address)")
    settings.add(parser, "--tls-cert", "GRPC_TLS_CERT", None, "PEM certificate of the gRPC port (with --tls-key: TLS)")
    settings.add(parser, "--tls-key", "GRPC_TLS_KEY", None, "PEM private key of --tls-cert")
    settings.add(parser, "--tls-client-ca", "GRPC_TLS_CLIENT_CA", None,
                 "PEM CA bundle: callers must present a certificate it signed (mTLS)")
    settings.add(parser, "--health-port", "GRPC_HEALTH_PORT", 0,
                 "a plaintext port with only the gRPC health service, for probes that cannot speak TLS such as "
                 "the kubelet's (0 = none)", int)


def server_credentials(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    """TLS for a pool's gRPC port from `add_server_args`' settings; None when they are unset."""
    if not args.tls_cert and not args.tls_key:
        if args.tls_client_ca:
            raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (args.tls_cert and args.tls_key):
        raise SystemExit("--tls-cert and --tls-key go together")
    return grpc.ssl_server_credentials([(_read(args.tls_key), _read(args.tls_cert))],
                                       root_certificates=_read(args.tls_client_ca),
                                       require_client_auth=bool(args.tls_client_ca))


def channel_credentials(ca: str | None, cert: str | None = None, key: str | None = None
                        ) -> grpc.ChannelCredentials | None:
    """TLS for calls to the pools: servers checked against `ca`, this client's certificate for mTLS."""
    if not ca:
        if cert or key:
            raise SystemExit("a client certificate for the pools needs their CA too (POOL_TLS_CA)")
        return None
    if bool(cert) != bool(key):
        raise SystemExit("the pools' client certificate and key go together (POOL_TLS_CERT, POOL_TLS_KEY)")
    return grpc.ssl_channel_credentials(root_certificates=_read(ca), private_key=_read(key),
                                        certificate_chain=_read(cert))


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


def listen_address(host: str, port: int) -> str:
    """gRPC's address for listening on `host`; empty, 0.0.0.0 or ::, every address (IPv4 and IPv6)."""
    if host in ("", "0.0.0.0", "::"):
        return f"[::]:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_server(add_servicer: Callable[[grpc.aio.Server], None], service_name: str, port: int,
                       credentials: grpc.ServerCredentials | None = None, health_port: int = 0, host: str = ""
                       ) -> tuple[grpc.aio.Server, health.aio.HealthServicer, grpc.aio.Server | None]:
    """A started server of one service plus health (TLS with `credentials`), and, with `health_port`, a plaintext
    server of the same health service alone (the service itself stays behind TLS), listening on `host`."""
    server = create_server()
    add_servicer(server)
    servicer = add_health(server, service_name)
    address = listen_address(host, port)
    if credentials:
        server.add_secure_port(address, credentials)
    else:
        server.add_insecure_port(address)
    await server.start()
    health_server = None
    if health_port:
        health_server = create_server()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, health_server)
        health_server.add_insecure_port(listen_address(host, health_port))
        await health_server.start()
    return server, servicer, health_server


async def serve(add_servicer: Callable[[grpc.aio.Server], None], service_name: str, port: int,
                metrics_port: int, credentials: grpc.ServerCredentials | None = None, health_port: int = 0,
                host: str = "") -> None:
    """Serve one service (see `start_server`; Prometheus metrics unless the port is 0) until SIGINT/SIGTERM, then
    shut down gracefully (see `serve_until_signal`)."""
    server, servicer, health_server = await start_server(add_servicer, service_name, port, credentials, health_port,
                                                         host)
    if metrics_port:
        start_metrics_server(host, metrics_port)
    await set_serving(servicer, service_name)
    await serve_until_signal(server, servicer)
    if health_server:
        await health_server.stop(None)


def start_metrics_server(host: str, port: int) -> None:
    """Prometheus /metrics on `host` (empty: every IPv4 address, prometheus_client's default)."""
    start_http_server(port, addr=host or "0.0.0.0")


async def stop_signal() -> None:
    """Return on the first SIGINT/SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def shutdown_times() -> tuple[float, float]:
    """(SHUTDOWN_DELAY_S, SHUTDOWN_GRACE_S): how long a stopping service keeps taking new calls while its
    NOT_SERVING / 503 spreads to balancers, then how long the calls in flight get to finish."""
    return float(os.environ.get("SHUTDOWN_DELAY_S", "0")), float(os.environ.get("SHUTDOWN_GRACE_S", "30"))


async def serve_until_signal(server: grpc.aio.Server, health: health.aio.HealthServicer | None = None) -> None:
    """Run a started server until SIGINT/SIGTERM. Then: report NOT_SERVING (readiness fails, balancers stop sending),
    keep serving for SHUTDOWN_DELAY_S while that spreads, stop taking calls and give the ones in flight (streams
    included) SHUTDOWN_GRACE_S to finish."""
    await stop_signal()
    delay, grace = shutdown_times()
    if health is not None:
        await health.enter_graceful_shutdown()
    await asyncio.sleep(delay)
    await server.stop(grace)
