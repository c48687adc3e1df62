"""The gateway's Prometheus series (served at GET /metrics on the REST port), request ids and access lines."""
import contextlib
import logging
import re
import time
import uuid

from prometheus_client import Counter, Gauge, Histogram

from services.common.settings import log_event

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
SINGLE_FLIGHT = Counter("gateway_single_flight_total", "Cache misses another gateway was encoding: taken from the "
                        "value it stored (shared), or encoded here after its claim ended without one (taken_over)",
                        ["outcome"])
POOL_ENDPOINTS = Gauge("gateway_pool_endpoints", "A pool's endpoints: serving (in rotation), refused (another "
                       "checkpoint than the gateway's), unchecked (facts not read since they connected)",
                       ["pool", "state"])
POOL_MISMATCHES = Counter("gateway_pool_mismatch_total", "Endpoints refused for serving another checkpoint",
                          ["pool"])


class Phases:
    """Where a request's time before its first token goes (seconds per phase: fetch, preprocess, cache, prompt,
    vision, store (the vision pool writing the embeddings to the cache), read (the decoder reading them), decoder),
    for its access line and its Server-Timing header."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def split(self, name: str, part: str, seconds: float) -> None:
        """`seconds` of phase `name` were its `part` (a pool's own report of a step inside its call)."""
        if seconds > 0:
            self.add(name, -seconds)
            self.add(part, seconds)

    def decoder(self, seconds: float, read_s: float) -> None:
        """The decoder's call, from sending it to its first tokens, of which it spent `read_s` reading the images'
        embeddings (its first message's embeddings_s)."""
        self.add("decoder", seconds)
        self.split("decoder", "read", read_s)

    def server_timing(self) -> str:
        return ", ".join(f"{name};dur={s * 1e3:.1f}" for name, s in self.seconds.items())

    def fields(self) -> dict[str, float]:
        return {f"{name}_s": round(s, 4) for name, s in self.seconds.items()}


access_log = logging.getLogger("gateway.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(given: str | None) -> str:
    """The client's X-Request-Id when it is a sane token, else a new one; carried to both pools and their logs."""
    return given if given and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def request_done(api: str, request_id: str, status, start: float, ttft_s: float | None,
                 prompt_tokens: int | None, completion_tokens: int | None, phases: Phases | None = None) -> None:
    """A chat request's outcome, REST or gRPC: its counters and its access line (with the phases of its TTFT)."""
    IN_FLIGHT.labels(api).dec()
    REQUESTS.labels(api, str(status)).inc()
    seconds = time.perf_counter() - start
    LATENCY.labels(api).observe(seconds)
    log_event(access_log, "chat request", request_id=request_id, api=api, status=status, prompt_tokens=prompt_tokens,
              completion_tokens=completion_tokens, ttft_s=ttft_s, duration_s=round(seconds, 4),
              **(phases.fields() if phases else {}))


class RestMetrics:
    """ASGI middleware for /v1/chat/completions: its request id (X-Request-Id in and out), its time to the last
    byte (a streamed answer included), and one access line with status, tokens and time to first token."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), None
        rid = request_id(dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1") or None)
        state = scope.setdefault("state", {})
        state["request_id"] = rid

        async def observe(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        IN_FLIGHT.labels("rest").inc()
        try:
            await self.app(scope, receive, observe)
        except Exception:
            status = status or 500  # Starlette's outermost middleware answers an escaped fault with a 500
            raise
        finally:
            # A stream that failed after its 200 is that error; no answer and no fault: the client left first (e.g.
            # during its upload), nginx's 499.
            status = state.get("failed_status") or status or 499
            request_done("rest", rid, status, start, state.get("ttft_s"), state.get("prompt_tokens"),
                         state.get("completion_tokens"), state.get("phases"))
