"""The gateway's Prometheus series, served at GET /metrics on the REST port."""
import time

from prometheus_client import Counter, Gauge, Histogram

_SECONDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0]
REQUESTS = Counter("gateway_requests_total", "Chat requests by API and outcome (HTTP status or gRPC code)",
                   ["api", "status"])
IN_FLIGHT = Gauge("gateway_requests_in_flight", "Chat requests being served (the pools' scale-from-zero demand)",
                  ["api"])
LATENCY = Histogram("gateway_request_seconds", "Chat request time, to the end of the answer", ["api"],
                    buckets=_SECONDS)
TTFT = Histogram("gateway_time_to_first_token_seconds", "Chat request time to its first tokens (images included)",
                 ["api"], buckets=_SECONDS)
IMAGE_CACHE = Counter("gateway_image_cache_total", "Image embedding look-ups in Redis", ["result"])


class RestMetrics:
    """ASGI middleware timing /v1/chat/completions to its last byte (a streamed answer included)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500  # 500 unless a response starts

        async def observe(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        IN_FLIGHT.labels("rest").inc()
        try:
            await self.app(scope, receive, observe)
        finally:
            IN_FLIGHT.labels("rest").dec()
            REQUESTS.labels("rest", str(status)).inc()
            LATENCY.labels("rest").observe(time.perf_counter() - start)
