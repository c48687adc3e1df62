"""Backpressure at the gateway's door: a bound on concurrent chat requests and on the size of a request body.

Beyond them a request is refused at once (429 with Retry-After, or RESOURCE_EXHAUSTED on gRPC; 413 for a body too
large) instead of queueing memory and work without limit.
"""
import asyncio
import contextlib
import json

from services.gateway.errors import ApiError

CHAT_PATH = "/v1/chat/completions"


class Admission:
    def __init__(self, max_concurrent: int):
        self.max_concurrent, self.active = max_concurrent, 0

    @contextlib.contextmanager
    def slot(self):
        if self.active >= self.max_concurrent:
            raise ApiError(429, f"the server is serving its limit of {self.max_concurrent} concurrent requests; "
                                "retry shortly", type="rate_limit_error")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


class PixelBudget:
    """Decoded pixels in flight over all requests (decoding holds ~3-4 bytes per pixel): an image waits until its
    pixels fit; one larger than the whole budget runs alone."""

    def __init__(self, pixels: int):
        self.total, self.used = pixels, 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int):
        async with self._changed:
            await self._changed.wait_for(lambda: self.used == 0 or self.used + pixels <= self.total)
            self.used += pixels
        try:
            yield
        finally:
            async with self._changed:
                self.used -= pixels
                self._changed.notify_all()


class RestAdmission:
    """ASGI middleware for the chat endpoint: reads the body up to `max_body_bytes` (413 beyond), then runs the
    request in an admission slot (429 when none is free) until its last byte is sent."""

    def __init__(self, app, admission: Admission, max_body_bytes: int):
        self.app, self.admission, self.max_body_bytes = app, admission, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != CHAT_PATH:
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                return await refuse(send, ApiError(413, f"the request body exceeds {self.max_body_bytes} bytes"))
        # Joined once: `body += chunk` copies the whole body per chunk (a 20 MB body in 64 KiB chunks: 1.6-2.7 s of
        # the event loop, against 15 ms gathered and joined).
        body = b"".join(chunks)
        replayed = False

        async def replay():  # the body once, then the client's own messages (e.g. its disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            with self.admission.slot():
                await self.app(scope, replay, send)
        except ApiError as e:  # no slot: nothing was sent yet
            await refuse(send, e, retry_after=1)


async def refuse(send, error: ApiError, retry_after: int | None = None) -> None:
    """Answer an ASGI request with an OpenAI-style error before it reached the app."""
    headers = [(b"content-type", b"application/json")]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(error.body()).encode()})
