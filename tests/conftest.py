"""Shared fixtures: the tiny checkpoint, a private Redis, the running stack, and the transformers reference."""
import base64
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from bench.families import noise_image  # noqa: F401 (the tests' noise images, the bench's own)
from tests.reference_preprocess import reference_pixel_values
from tools.make_tiny_checkpoint import write_tiny_checkpoint
from tools.run_local import ROOT, free_port, start_redis, start_stack


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-internvl2_5")


@pytest.fixture(scope="session")
def cfg(tiny_checkpoint):
    from services.common.checkpoint import read_model_config
    return read_model_config(tiny_checkpoint)


@pytest.fixture(scope="session")
def lm(cfg, tiny_checkpoint):
    """The tiny checkpoint's language model as the decoder serves it (CPU, fp32)."""
    from services.llm_decoder.models import load_language_model
    return load_language_model(cfg, tiny_checkpoint, "cpu", torch.float32)


@pytest.fixture(params=[False, True], ids=["sync", "overlap"])
def overlap(request):
    """Engine tests run both ways: each step read back at once, and overlapped (a step queued before the one before
    it is read back, as on CUDA)."""
    return request.param


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """REDIS_URL when set; else a Redis container where Docker runs; else our own redis-server on a free port."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        from testcontainers.redis import RedisContainer
        with RedisContainer("redis:7") as container:
            yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
        return
    with open(tmp_path_factory.mktemp("redis") / "redis.log", "w") as log:
        proc, url = start_redis(log)
        yield url
        proc.terminate()
        proc.wait()


# The one loopback address the test stack may fetch image URLs from (every other non-public address is refused).
IMAGE_HOST = "127.0.0.2"


@pytest.fixture(scope="session")
def stack(tiny_checkpoint, redis_url, tmp_path_factory):
    """The three services as real processes. A fresh cache namespace keeps a shared Redis's old entries out."""
    log_path = tmp_path_factory.mktemp("stack") / "stack.log"
    namespace = f"test-{uuid.uuid4().hex}"
    with open(log_path, "w") as log:
        try:
            s = start_stack(str(tiny_checkpoint), redis_url=redis_url, log=log,
                            extra_env={"CACHE_NAMESPACE": namespace,
                                       "IMAGE_URL_ALLOW": IMAGE_HOST + "/32", "MAX_VIDEO_FRAMES": "100"})
        except Exception:
            print(log_path.read_text())
            raise
        s.log_path = log_path  # what the services wrote (their log lines)
        s.cache_namespace = namespace
        yield s
        s.stop()


def run_bench(module: str, out: Path, *args: str, timeout_s: float = 600) -> tuple[str, dict]:
    """`python -m bench.<module> --smoke ... --out out`, which must exit 0: its markdown report and its JSON."""
    proc = subprocess.run([sys.executable, "-m", f"bench.{module}", "--smoke", *args, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out.read_text(), json.loads(out.with_suffix(".json").read_text())


def start_gateway(stack, checkpoint: Path, log_path: Path, **env) -> tuple[subprocess.Popen, str]:
    """Another gateway process over the stack's pools (settings `env`), once it is ready; its process and URL."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.gateway", "--model", str(checkpoint),
                                 "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(free_port()),
                                 "--vision-addr", ",".join(stack.vision_addrs),
                                 "--decoder-addr", ",".join(stack.decoder_addrs)],
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the gateway did not come up: {log_path.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url
        time.sleep(0.2)


@pytest.fixture(scope="module")
def client(stack):
    """The official OpenAI client on the stack's gateway."""
    import openai
    return openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def gateway(stack):
    """A gRPC stub of the stack's gateway."""
    import grpc
    from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
    with grpc.insecure_channel(stack.gateway_grpc) as channel:
        yield pb_grpc.GatewayStub(channel)


class Reference:
    """transformers' InternVLForConditionalGeneration with the prompt and pixels the model cards' code builds."""

    def __init__(self, path: Path):
        from transformers import AutoTokenizer, InternVLForConditionalGeneration
        self.model = InternVLForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32, attn_implementation="sdpa").eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        from services.llm_decoder.detokenizer import TextDecoder
        self.text = TextDecoder(self.tokenizer.backend_tokenizer).decode  # an answer's text: control tokens skipped

    def generate(self, messages: list[dict], images: list[Image.Image | torch.Tensor], max_num: int,
                 max_new_tokens: int) -> list[int]:
        """messages in the chat-template form ({"type": "image"} parts, or <IMG_CONTEXT> where the cards' code puts
        an image in the text); images in order of appearance, as PIL images or the cards' pixel_values of one."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pixels = [img if isinstance(img, torch.Tensor) else reference_pixel_values(img, max_num=max_num)
                  for img in images]
        pieces = text.split("<IMG_CONTEXT>")
        assert len(pieces) == len(pixels) + 1
        text = pieces[0] + "".join(f"<img>{'<IMG_CONTEXT>' * 256 * len(p)}</img>{piece}"
                                   for p, piece in zip(pixels, pieces[1:]))
        input_ids = self.tokenizer(text, return_tensors="pt").input_ids
        kwargs = {"pixel_values": torch.cat(pixels)} if pixels else {}
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
        return out[0, input_ids.shape[1]:].tolist()


@pytest.fixture(scope="session")
def reference(tiny_checkpoint) -> Reference:
    return Reference(tiny_checkpoint)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def encode_video(frames: list[np.ndarray], container: str = "mp4", codec: str = "libx264", fps: int = 10) -> bytes:
    """A video file of RGB uint8 frames [h, w, 3] (even sizes: the codecs store yuv420p), written by PyAV."""
    import av
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def noise_video(frames: int, width: int, height: int, seed: int, **kwargs) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_video([rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(frames)], **kwargs)


def solid_video(width: int, height: int) -> bytes:
    """A few kB of H.264 declaring width x height frames (black)."""
    import av
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=1, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        frame = av.VideoFrame(width, height, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        for _ in range(2):  # FFmpeg's probing decodes H.264 until it has seen frames: give it more than one
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


def video_data_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()
