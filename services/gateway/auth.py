"""Optional API keys: `Authorization: Bearer <key>` on the OpenAI routes and the public gRPC service.

Keys are held as SHA-256 digests and compared in constant time; with no key configured the gateway is open.
"""
import hashlib
import hmac
from pathlib import Path

from services.gateway.admission import refuse
from services.gateway.errors import ApiError


def read_api_keys(keys: str, keys_file: str | None) -> list[str]:
    """`keys`: comma-separated; `keys_file`: one key per line (# comments allowed), e.g. a mounted Secret."""
    listed = [k.strip() for k in keys.split(",") if k.strip()]
    if keys_file:
        listed += [line.strip() for line in Path(keys_file).read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith("#")]
    return listed


class ApiKeys:
    def __init__(self, keys: list[str]):
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys if k]

    def check(self, authorization: str | None) -> None:
        """Raise a 401 unless keys are off or `authorization` is "Bearer <a configured key>"."""
        if not self.digests:
            return
        scheme, _, key = (authorization or "").partition(" ")
        digest = hashlib.sha256(key.strip().encode()).digest()
        # Every digest is compared (no early exit), each in constant time.
        if not (scheme.lower() == "bearer" and sum(hmac.compare_digest(digest, d) for d in self.digests)):
            raise ApiError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key")


class RestAuth:
    """ASGI middleware: the OpenAI routes (/v1/...) need a key; /health and /metrics stay open for probes."""

    def __init__(self, app, keys: ApiKeys):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = dict(scope["headers"])
            try:
                self.keys.check(headers.get(b"authorization", b"").decode("latin-1") or None)
            except ApiError as e:
                return await refuse(send, e)
        await self.app(scope, receive, send)
