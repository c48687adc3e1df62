"""Getting client images: fetch the encoded bytes (data: or http(s): URL), decode them safely.

Every client mistake (bad URL, unreachable host, oversize or corrupt image) becomes a 400
`ApiError` whose message says what is wrong, so it never surfaces later as a 500 from
the vision encoder.
"""
from __future__ import annotations

import asyncio
import binascii
import contextlib
import hashlib
import io
import ipaddress
import socket
import urllib.parse
from dataclasses import dataclass

import httpx
import pybase64
from PIL import Image, UnidentifiedImageError

from services.gateway.errors import bad_request

# Formats we are willing to decode. Pillow can open many more (EPS would even run
# Ghostscript); an internet-facing service only needs the common web formats.
# JPEG covers MPO (multi-picture JPEGs from phones): Pillow opens them through the JPEG plugin.
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

# Leading bytes of each supported format, used only to word error messages
# ("looks like a PNG but is corrupt" versus "not an image at all").
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)

_URL_SHOWN_CHARS = 200  # URLs are echoed in errors; keep long ones from flooding the message


def image_hash(data: bytes) -> str:
    """SHA-256 hex digest of the encoded image bytes (input to the embedding cache key)."""
    return hashlib.sha256(data).hexdigest()


def _sniff_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    return None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone ((0, 0) when unreadable: decoding will say why)."""
    try:
        with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as img:
            return img.size
    except Exception:
        return 0, 0


def image_pixels(data: bytes) -> int:
    width, height = image_size(data)
    return width * height


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode encoded image bytes into a fully loaded RGB `PIL.Image.Image`.

    The declared dimensions are checked against `max_pixels` from the header alone,
    before any pixel data is decompressed, so a small file declaring a huge image
    (decompression bomb) costs nothing. The image is then decoded completely, so a
    truncated or corrupt file fails here rather than later in tiling. Mode conversion
    is `convert("RGB")`, as in the reference preprocessing (alpha is dropped).
    Raises a 400 `ApiError` for anything that is not a usable image.
    """
    if not data:
        raise bad_request("image data is empty")
    try:
        # Image.open reads only the header; Pillow itself refuses headers declaring more
        # than 2 * Image.MAX_IMAGE_PIXELS pixels (DecompressionBombError).
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise bad_request(f"image dimensions are too large: over the limit of {max_pixels} pixels") from None
    except UnidentifiedImageError:
        sniffed = _sniff_format(data)
        if sniffed:
            raise bad_request(f"image data looks like {sniffed} but its header could not be parsed "
                              "(corrupt file, or zero width or height)") from None
        raise bad_request("image data is not a supported image; supported formats: "
                          + ", ".join(SUPPORTED_FORMATS)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        sniffed = _sniff_format(data)
        what = f"{sniffed} image" if sniffed else "image data"
        raise bad_request(f"{what} header could not be parsed: {exc}") from None

    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise bad_request(f"image has zero size ({width}x{height})")
        if width * height > max_pixels:
            raise bad_request(f"image is {width}x{height} = {width * height} pixels, "
                              f"over the limit of {max_pixels} pixels")
        try:
            image.load()  # full decode: truncation and corrupt data surface here
            # convert() also detaches the result from the BytesIO holding the encoded bytes.
            return image.convert("RGB")
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise bad_request(f"{image.format} image is truncated or corrupt: {exc}") from None


def _shown(url: str) -> str:
    return url if len(url) <= _URL_SHOWN_CHARS else url[:_URL_SHOWN_CHARS] + "..."


def _too_large(max_bytes: int, kind: str):
    return bad_request(f"{kind} larger than {max_bytes} bytes")


def _decode_data_url(url: str, max_bytes: int, kind: str) -> bytes:
    """Bytes of a `data:[<media type>][;params];base64,<payload>` URL."""
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise bad_request("malformed data URL: no ',' before the payload")
    media_type, *params = (part.strip().lower() for part in header.split(";"))
    if "base64" not in params:
        raise bad_request("data URL must be base64-encoded, e.g. data:image/png;base64,...")
    if media_type and not (media_type.startswith(f"{kind}/") or media_type == "application/octet-stream"):
        raise bad_request(f"data URL media type {media_type!r} is not {kind}/*")

    if "%" in payload:
        payload = urllib.parse.unquote(payload)
    data = None
    if len(payload) // 4 * 3 <= max_bytes + 2:  # the usual payload, plain base64 within the limit: as it is
        with contextlib.suppress(binascii.Error, ValueError):
            data = pybase64.b64decode(payload, validate=True)
    if data is None:
        # Tolerate what clients commonly produce: line breaks, the URL-safe alphabet, missing '=' padding.
        # Anything else outside the base64 alphabet is an error.
        payload = "".join(payload.split()).replace("-", "+").replace("_", "/")
        payload += "=" * (-len(payload) % 4)
        # Cheap pre-check on the encoded length, so an oversize payload is not decoded at all.
        if len(payload) // 4 * 3 - payload[-2:].count("=") > max_bytes:
            raise _too_large(max_bytes, kind)
        try:
            data = pybase64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise bad_request(f"data URL payload is not valid base64: {exc}") from None
    if len(data) > max_bytes:
        raise _too_large(max_bytes, kind)
    if not data:
        raise bad_request(f"data URL contains no {kind} data")
    return data


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class UrlPolicy:
    """Where image URLs may lead. By default only public unicast addresses: an image URL must never reach loopback,
    private, link-local, CGNAT, multicast, reserved or unspecified addresses (Redis, the pools, the cloud metadata
    service, other pods), however the URL spells them. `allow` opens chosen networks or host names (local
    development, in-cluster image stores)."""
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    hosts: frozenset[str] = frozenset()
    max_redirects: int = 5

    @classmethod
    def parse(cls, allow: str, max_redirects: int = 5) -> "UrlPolicy":
        """`allow`: comma-separated networks (10.0.0.0/8, ::1/128) and host names (images.internal)."""
        networks, hosts = [], set()
        for item in filter(None, (x.strip() for x in allow.split(","))):
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item.lower().rstrip("."))
        return cls(tuple(networks), frozenset(hosts), max_redirects)

    def allows(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%")[0])
        if any(ip in net for net in self.networks):
            return True
        if isinstance(ip, ipaddress.IPv6Address):
            # IPv6 forms that carry an IPv4 address (mapped, NAT64, 6to4, Teredo) are judged by that address too.
            embedded = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ()),
                        ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None]
            if any(v4 is not None and not self.allows(str(v4)) for v4 in embedded):
                return False
            if ip.ipv4_mapped:
                return True
        return ip.is_global and not ip.is_multicast


async def _resolve(url: httpx.URL, policy: UrlPolicy, shown: str, kind: str) -> str | None:
    """The checked address to connect to, or None when the host name itself is allowed. Resolved once: the
    connection goes to this address, so a name that resolves elsewhere the second time gains nothing."""
    host = url.host.lower().rstrip(".")
    if host in policy.hosts:
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise bad_request(f"could not fetch {kind} from {shown}: cannot resolve {host!r} ({exc})") from None
    addresses = [info[4][0] for info in infos]
    if not addresses or not all(policy.allows(a) for a in addresses):
        raise bad_request(f"{kind} URL {shown} leads to an address this server does not fetch from (only public "
                          "addresses are allowed)")
    return addresses[0]


def _checked_url(url: str, shown: str, kind: str) -> httpx.URL:
    # Validated up front what httpx would only trip over mid-connect (a port over 65535 surfaces as a bare
    # OverflowError from the socket layer).
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise bad_request(f"invalid {kind} URL {shown}: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise bad_request(f"{kind} URL {shown} redirects to an unsupported scheme {parsed.scheme!r}")
    if not parsed.host:
        raise bad_request(f"invalid {kind} URL {shown}: no host")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise bad_request(f"invalid {kind} URL {shown}: port {parsed.port} out of range")
    return parsed


async def _download(url: str, client: httpx.AsyncClient, max_bytes: int, timeout_s: float,
                    policy: UrlPolicy, kind: str) -> bytes:
    shown = _shown(url)
    try:
        # httpx timeouts apply per network operation; asyncio.timeout bounds the whole
        # download (redirects included), so a server trickling bytes cannot hold the request open.
        async with asyncio.timeout(timeout_s):
            target = _checked_url(url, shown, kind)
            for _ in range(policy.max_redirects + 1):
                address = await _resolve(target, policy, shown, kind)
                request_url, extensions, headers = target, {}, {}
                if address is not None:  # connect to the address that was checked, as the host it belongs to
                    request_url = target.copy_with(host=address)
                    headers["Host"] = target.netloc.decode("ascii")
                    if target.scheme == "https":
                        extensions["sni_hostname"] = target.host
                async with client.stream("GET", request_url, headers=headers, extensions=extensions,
                                         timeout=timeout_s, follow_redirects=False) as response:
                    if response.is_redirect:  # each hop is checked like the first
                        target = _checked_url(str(target.join(response.headers.get("location", ""))), shown, kind)
                        continue
                    return await _read_body(response, max_bytes, shown, kind)
            raise bad_request(f"{kind} URL {shown} redirects more than {policy.max_redirects} times")
    except (TimeoutError, httpx.TimeoutException):
        raise bad_request(f"timed out after {timeout_s:g} s fetching {kind} from {shown}") from None
    except httpx.InvalidURL as exc:
        raise bad_request(f"invalid {kind} URL {shown}: {exc}") from None
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise bad_request(f"could not fetch {kind} from {shown}: {reason}") from None


async def _read_body(response: httpx.Response, max_bytes: int, shown: str, kind: str) -> bytes:
    if not response.is_success:
        raise bad_request(f"could not fetch {kind} from {shown}: HTTP "
                          f"{response.status_code} {response.reason_phrase}".rstrip())
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes, kind)
    body = bytearray()
    # Enforced while reading: a missing or lying Content-Length changes nothing.
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(max_bytes, kind)
    if not body:
        raise bad_request(f"{kind} URL {shown} returned an empty body")
    return bytes(body)


async def fetch_image(url: str, client: httpx.AsyncClient, max_bytes: int, timeout_s: float,
                      policy: UrlPolicy = UrlPolicy(), kind: str = "image") -> bytes:
    """Return the encoded image (or `kind`: video) bytes named by `url` (a `data:` or `http(s)://` URL).

    At most `max_bytes` are accepted and an http(s) fetch takes at most `timeout_s`
    seconds in total; redirects are followed, each checked against `policy` like the URL itself.
    Any failure is a 400 `ApiError`.
    The bytes are not decoded here: see `decode_image`.
    """
    url = url.strip()
    scheme, colon, _ = url.partition(":")
    scheme = scheme.lower() if colon else ""
    if scheme == "data":
        return _decode_data_url(url, max_bytes, kind)
    if scheme in ("http", "https"):
        return await _download(url, client, max_bytes, timeout_s, policy, kind)
    if not scheme:
        raise bad_request(f"{kind} URL {_shown(url)!r} has no scheme; use http(s):// or a data: URL")
    raise bad_request(f"unsupported {kind} URL scheme {scheme!r}; use http(s):// or a data: URL")
