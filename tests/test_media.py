"""services/gateway/media.py: fetching and decoding client images; every failure is a clear 400."""
import asyncio
import base64
import hashlib
import http.server
import io
import socket
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from services.gateway import media
from services.gateway.errors import ApiError
from services.gateway.media import UrlPolicy, decode_image, fetch_image, image_hash
from services.gateway.metrics import Phases

MAX_PIXELS = 50_000_000
MAX_BYTES = 1_000_000


def noise(width=64, height=48, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8))


def encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


PNG = encode(noise(), "PNG")
JPEG = encode(noise(), "JPEG", quality=90)


def png_header_only(width, height):
    """A PNG with a valid IHDR declaring width x height and no pixel data at all."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def data_url(data, media_type="image/png"):
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def bad_request(excinfo, *fragments):
    """Assert the ApiError is a 400 whose message contains every fragment."""
    error = excinfo.value
    assert isinstance(error, ApiError) and error.status == 400
    for fragment in fragments:
        assert fragment.lower() in error.message.lower(), error.message
    return error.message


# ---------------------------------------------------------------------------- decode_image

@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF", "BMP"])
def test_decode_formats(fmt):
    image = decode_image(encode(noise(), fmt), MAX_PIXELS)
    assert image.mode == "RGB" and image.size == (64, 48)


def test_decode_png_is_lossless_and_loaded():
    image = decode_image(PNG, MAX_PIXELS)
    assert np.array_equal(np.asarray(image), np.asarray(noise()))


def test_decode_jpeg_matches_pillow():
    image = decode_image(JPEG, MAX_PIXELS)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(JPEG)).convert("RGB")))


def test_decode_rgba_drops_alpha_like_reference():
    rgba = noise(channels=4)
    image = decode_image(encode(rgba, "PNG"), MAX_PIXELS)
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(rgba)[..., :3])


def test_decode_palette_and_greyscale():
    assert decode_image(encode(noise().convert("P"), "PNG"), MAX_PIXELS).mode == "RGB"
    assert decode_image(encode(noise().convert("L"), "PNG"), MAX_PIXELS).mode == "RGB"
    assert decode_image(encode(noise().convert("CMYK"), "JPEG"), MAX_PIXELS).mode == "RGB"


@pytest.mark.parametrize("data", [b"hello, this is not an image", b"\x00" * 100, b"%PDF-1.7\n"])
def test_non_image_bytes(data):
    with pytest.raises(ApiError) as excinfo:
        decode_image(data, MAX_PIXELS)
    bad_request(excinfo, "not a supported image", "PNG, JPEG")


def test_empty_bytes():
    with pytest.raises(ApiError) as excinfo:
        decode_image(b"", MAX_PIXELS)
    bad_request(excinfo, "empty")


def test_unsupported_format_refused():
    with pytest.raises(ApiError) as excinfo:
        decode_image(encode(noise(), "TIFF"), MAX_PIXELS)
    bad_request(excinfo, "not a supported image")


@pytest.mark.parametrize("data,fmt", [(PNG, "PNG"), (JPEG, "JPEG")])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated(data, fmt, keep):
    with pytest.raises(ApiError) as excinfo:
        decode_image(data[:int(len(data) * keep)], MAX_PIXELS)
    bad_request(excinfo, fmt, "truncated")


def test_truncated_header():
    with pytest.raises(ApiError) as excinfo:
        decode_image(PNG[:20], MAX_PIXELS)
    bad_request(excinfo, "PNG", "header could not be parsed", "truncated")


@pytest.mark.parametrize("width,height", [(0, 10), (10, 0), (0, 0)])
def test_zero_size_png(width, height):
    # Pillow refuses zero-size PNG headers itself; the message still names the format.
    with pytest.raises(ApiError) as excinfo:
        decode_image(png_header_only(width, height), MAX_PIXELS)
    bad_request(excinfo, "looks like PNG", "zero width or height")


def test_zero_size_guard(monkeypatch):
    # In case a decoder ever reports a zero-size image, decode_image still refuses it.
    monkeypatch.setattr(media.Image, "open", lambda *args, **kwargs: Image.new("RGB", (0, 7)))
    with pytest.raises(ApiError) as excinfo:
        decode_image(PNG, MAX_PIXELS)
    bad_request(excinfo, "zero size", "0x7")


def test_over_max_pixels_checked_before_decoding():
    # The file holds no pixel data: had it been decoded, the error would be about
    # truncation, not size.
    with pytest.raises(ApiError) as excinfo:
        decode_image(png_header_only(10_000, 5_000), max_pixels=1_000_000)
    bad_request(excinfo, "10000x5000", "over the limit of 1000000 pixels")


def test_decompression_bomb_refused_by_pillow_limit():
    # 30000 x 30000 is over Pillow's own hard limit, which fires inside Image.open.
    with pytest.raises(ApiError) as excinfo:
        decode_image(png_header_only(30_000, 30_000), MAX_PIXELS)
    bad_request(excinfo, "too large", f"over the limit of {MAX_PIXELS} pixels")


def test_real_image_over_limit():
    with pytest.raises(ApiError) as excinfo:
        decode_image(PNG, max_pixels=64 * 48 - 1)
    bad_request(excinfo, "64x48", "over the limit")
    assert decode_image(PNG, max_pixels=64 * 48).size == (64, 48)


def test_image_hash():
    assert image_hash(PNG) == hashlib.sha256(PNG).hexdigest()
    assert len(image_hash(b"")) == 64 and image_hash(PNG) != image_hash(JPEG)


# ---------------------------------------------------------------------------- data: URLs

LOOPBACK_ALLOWED = UrlPolicy.parse("127.0.0.0/8")  # the test servers listen on loopback


async def fetch(url, max_bytes=MAX_BYTES, timeout_s=5.0, policy=LOOPBACK_ALLOWED):
    async with httpx.AsyncClient(trust_env=False) as client:
        return await fetch_image(url, client, max_bytes, timeout_s, policy)


@pytest.mark.parametrize("data,media_type", [(PNG, "image/png"), (JPEG, "image/jpeg"), (JPEG, "")])
async def test_data_url(data, media_type):
    assert await fetch(data_url(data, media_type)) == data


async def test_data_url_lenient_forms():
    encoded = base64.b64encode(PNG).decode()
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    assert await fetch("data:image/png;base64," + wrapped) == PNG
    assert await fetch("data:image/png;base64," + encoded.rstrip("=")) == PNG
    assert await fetch("data:image/png;base64," + base64.urlsafe_b64encode(PNG).decode()) == PNG
    assert await fetch("DATA:image/png;charset=binary;BASE64," + encoded) == PNG


@pytest.mark.parametrize("payload", ["@@@not-base64!!!", "aGVsbG8", "a", "ü===="])
async def test_data_url_invalid_base64(payload):
    if payload == "aGVsbG8":  # valid once padded: decodes to b"hello"
        assert await fetch("data:image/png;base64," + payload) == b"hello"
        return
    with pytest.raises(ApiError) as excinfo:
        await fetch("data:image/png;base64," + payload)
    bad_request(excinfo, "not valid base64")


async def test_data_url_errors():
    with pytest.raises(ApiError) as excinfo:
        await fetch("data:image/png;base64")
    bad_request(excinfo, "malformed data URL")
    with pytest.raises(ApiError) as excinfo:
        await fetch("data:image/png,rawbytes")
    bad_request(excinfo, "base64")
    with pytest.raises(ApiError) as excinfo:
        await fetch(data_url(PNG, "text/plain"))
    bad_request(excinfo, "text/plain", "not image/*")
    with pytest.raises(ApiError) as excinfo:
        await fetch("data:image/png;base64,")
    bad_request(excinfo, "no image data")


async def test_data_url_oversize():
    with pytest.raises(ApiError) as excinfo:
        await fetch(data_url(PNG), max_bytes=len(PNG) - 1)
    bad_request(excinfo, f"image larger than {len(PNG) - 1} bytes")
    assert await fetch(data_url(PNG), max_bytes=len(PNG)) == PNG
    # Line breaks make the text longer, not the image: still within the limit.
    encoded = base64.b64encode(PNG).decode()
    spaced = "\r\n".join(encoded[i:i + 4] for i in range(0, len(encoded), 4))
    assert await fetch("data:image/png;base64," + spaced, max_bytes=len(PNG)) == PNG


async def test_data_url_non_image_fails_at_decode():
    data = await fetch(data_url(b"plain text, not an image"))
    with pytest.raises(ApiError) as excinfo:
        decode_image(data, MAX_PIXELS)
    bad_request(excinfo, "not a supported image")


@pytest.mark.parametrize("url,fragment", [
    ("ftp://example.com/a.png", "unsupported image URL scheme 'ftp'"),
    ("file:///etc/passwd", "unsupported image URL scheme 'file'"),
    ("just/a/path.png", "has no scheme"),
    ("", "has no scheme"),
])
async def test_unsupported_schemes(url, fragment):
    with pytest.raises(ApiError) as excinfo:
        await fetch(url)
    bad_request(excinfo, fragment)


# ---------------------------------------------------------------------------- http(s) URLs

BIG = b"\x89PNG" + b"x" * (MAX_BYTES + 10)


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, status, body, content_type="image/png", length=True):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        try:
            if self.path == "/image.png":
                self._send(200, PNG)
            elif self.path == "/image.jpg":
                self._send(200, JPEG, "image/jpeg")
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/image.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/big":
                self._send(200, BIG)
            elif self.path == "/big-no-length":  # HTTP/1.0, body ends at close: only reading can tell
                self._send(200, BIG, length=False)
            elif self.path == "/slow":
                time.sleep(1.5)
                self._send(200, PNG)
            elif self.path == "/trickle":  # every read is quick, the whole download is not
                self.send_response(200)
                self.end_headers()
                for byte in PNG[:30]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.05)
            elif self.path == "/empty":
                self._send(200, b"")
            elif self.path == "/error":
                self._send(500, b"boom", "text/plain")
            else:
                self._send(404, b"not found", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (size limit, timeout): expected


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("path,expected", [("/image.png", PNG), ("/image.jpg", JPEG), ("/redirect", PNG)])
async def test_http_fetch(server, path, expected):
    data = await fetch(server + path)
    assert data == expected
    assert decode_image(data, MAX_PIXELS).size == (64, 48)


@pytest.mark.parametrize("path,fragment", [("/missing.png", "HTTP 404 Not Found"),
                                           ("/error", "HTTP 500")])
async def test_http_error_status(server, path, fragment):
    with pytest.raises(ApiError) as excinfo:
        await fetch(server + path)
    bad_request(excinfo, f"could not fetch image from {server}{path}", fragment)


@pytest.mark.parametrize("path", ["/big", "/big-no-length"])
async def test_http_oversize(server, path):
    with pytest.raises(ApiError) as excinfo:
        await fetch(server + path)
    bad_request(excinfo, f"image larger than {MAX_BYTES} bytes")


async def test_http_empty_body(server):
    with pytest.raises(ApiError) as excinfo:
        await fetch(server + "/empty")
    bad_request(excinfo, "empty body")


@pytest.mark.parametrize("path", ["/slow", "/trickle"])
async def test_http_timeout(server, path):
    started = time.monotonic()
    with pytest.raises(ApiError) as excinfo:
        await fetch(server + path, timeout_s=0.4)
    assert time.monotonic() - started < 1.2
    bad_request(excinfo, "timed out after 0.4 s", server + path)


async def test_http_connection_refused():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/image.png"
    with pytest.raises(ApiError) as excinfo:
        await fetch(url)
    bad_request(excinfo, f"could not fetch image from {url}")


@pytest.mark.parametrize("url", ["http://", "http://[::1/x.png", "http://127.0.0.1:99999/x.png"])
async def test_http_malformed_url(url):
    with pytest.raises(ApiError) as excinfo:
        await fetch(url)
    bad_request(excinfo, url.strip()[:10])


async def test_long_url_shortened_in_message(server):
    url = server + "/missing/" + "a" * 5000
    with pytest.raises(ApiError) as excinfo:
        await fetch(url)
    assert len(bad_request(excinfo, "HTTP 404")) < 400


# ---------------------------------------------------------------------------- URLs that must not reach inside

class Listener:
    """A loopback TCP listener that only counts connections: the tests assert it is never connected to."""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port, self.connections, self.stop = self.sock.getsockname()[1], 0, threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.fixture
def listener():
    lst = Listener()
    yield lst
    lst.close()


@pytest.mark.parametrize("spelling", ["127.0.0.1", "localhost", "2130706433", "0x7f000001", "0177.0.0.1", "127.1",
                                      "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "LOCALHOST.", "0.0.0.0"])
async def test_inside_addresses_are_refused_however_spelled(listener, spelling):
    with pytest.raises(ApiError) as excinfo:
        await fetch(f"http://{spelling}:{listener.port}/x.png", policy=UrlPolicy())
    assert excinfo.value.status == 400 and listener.connections == 0


@pytest.mark.parametrize("address", ["10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1",
                                     "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "fe80::1", "fc00::1",
                                     "ff02::1", "::", "::ffff:10.0.0.1", "64:ff9b::7f00:1",
                                     "2002:7f00:1::1"])
def test_non_public_ranges_are_not_allowed(address):
    assert not UrlPolicy().allows(address)


def test_public_addresses_and_allowed_networks():
    assert UrlPolicy().allows("93.184.216.34") and UrlPolicy().allows("2606:2800:220:1:248:1893:25c8:1946")
    policy = UrlPolicy.parse("10.1.0.0/16, images.internal")
    assert policy.allows("10.1.2.3") and not policy.allows("10.2.0.1") and policy.hosts == {"images.internal"}


async def test_a_redirect_inside_is_refused(listener):
    """An allowed server (127.0.0.2 here) redirecting to a loopback address that is not allowed."""
    class Redirect(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{listener.port}/x.png")
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Redirect)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ApiError) as excinfo:
            await fetch(f"http://127.0.0.2:{httpd.server_address[1]}/", policy=UrlPolicy.parse("127.0.0.2/32"))
        assert "only public addresses" in excinfo.value.message and listener.connections == 0
    finally:
        httpd.shutdown()
        httpd.server_close()


async def test_redirects_are_capped(server):
    with pytest.raises(ApiError) as excinfo:
        await fetch(server + "/redirect", policy=UrlPolicy.parse("127.0.0.0/8", max_redirects=0))
    assert "redirects more than 0 times" in excinfo.value.message
    assert await fetch(server + "/redirect") == PNG  # one hop is fine by default


async def test_the_connection_goes_to_the_checked_address(server, monkeypatch):
    """A name is resolved once; the request goes to that address with the name as Host (no second lookup)."""
    import services.gateway.media as media
    seen = []
    real = media._resolve

    async def resolve(url, *rest):
        seen.append(url.host)
        return await real(url.copy_with(host="127.0.0.1"), *rest)

    monkeypatch.setattr(media, "_resolve", resolve)
    port = server.rsplit(":", 1)[1]
    assert await fetch(f"http://images.example:{port}/image.png") == PNG
    assert seen == ["images.example"]


async def test_a_failed_image_cancels_the_other_downloads_of_its_request(server):
    """The gateway fetches a request's images together; the first that fails ends the others at once."""
    from services.gateway.chat import ChatService, Limits
    from services.gateway.schema import ImagePart

    chat = ChatService("m", None, None, None, None, Limits(url_policy=LOOPBACK_ALLOWED, fetch_timeout_s=10))
    async with httpx.AsyncClient(trust_env=False) as client:
        chat.http = client
        start = time.monotonic()
        with pytest.raises(ApiError) as excinfo:
            await chat._resolve_media([ImagePart(type="image_url", image_url={"url": server + path})
                                       for path in ("/slow", "/missing")], [1, 1], by_reference=False, phases=Phases())
        left = [t for t in asyncio.all_tasks() if "_fetch" in repr(t.get_coro()) and not t.done()]
    assert "404" in excinfo.value.message and time.monotonic() - start < 1.0  # /slow takes 1.5 s
    assert not left  # the slow download was cancelled, not left running
