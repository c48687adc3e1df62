"""services/gateway/video.py: the cards' frame sampling, decoding common containers and codecs, bad videos as 400s."""
import io

import numpy as np
import pytest
import torch

from services.gateway.errors import ApiError
from services.gateway.video import frame_indices, probe_video, video_tiles
from tests.conftest import encode_video, noise_video, solid_video
from tests.reference_preprocess import build_transform, get_index, load_video
from PIL import Image

# (frame count, fps, num_segments, bound)
INDEX_CASES = [
    (30, 10.0, 8, None), (300, 29.97, 8, None), (7, 25.0, 8, None), (1, 30.0, 8, None), (1000, 24.0, 32, None),
    (90, 30.0, 16, (0.5, 2.5)), (90, 30.0, 8, (1.0, 100.0)), (250, 23.976, 8, (2.0, 3.0)), (60, 30.0, 8, (1.0, 1.02)),
    (12, 2.5, 5, (0.2, 4.4)), (301, 15.0, 7, (0.0, 20.0)), (120, 60.0, 3, (0.25, 0.75)),
]


@pytest.mark.parametrize("num_frames,fps,num_segments,bound", INDEX_CASES)
def test_frame_indices_equal_the_cards_get_index(num_frames, fps, num_segments, bound):
    expected = get_index(bound, fps, num_frames - 1, first_idx=0, num_segments=num_segments).tolist()
    assert frame_indices(num_frames, fps, num_segments, bound) == expected


def decode(data: bytes, num_segments=8, bound=None, max_frames=1000, max_pixels=4096 * 4096,
           threads=1) -> np.ndarray:
    probe_video(data, max_pixels)
    return video_tiles(data, num_segments, bound, max_frames=max_frames, max_pixels=max_pixels, tile_size=448,
                       use_thumbnail=True, threads=threads)


@pytest.mark.parametrize("container,codec", [("mp4", "libx264"), ("webm", "libvpx-vp9"), ("matroska", "libx264"),
                                             ("matroska", "libvpx-vp9")])
@pytest.mark.parametrize("bound,threads", [(None, 1), (None, 3), ((0.6, 2.2), 1), ((0.6, 2.2), 3)])
def test_frames_equal_the_cards_load_video(container, codec, bound, threads):
    data = noise_video(30, 96, 64, seed=5, container=container, codec=codec)
    tiles = decode(data, num_segments=8, bound=bound, threads=threads)
    expected, patches = load_video(io.BytesIO(data), bound=bound, max_num=1, num_segments=8)
    assert tiles.shape == (8, 448, 448, 3) and patches == [1] * 8
    normalise = build_transform(448)
    assert torch.equal(torch.stack([normalise(Image.fromarray(t)) for t in tiles]), expected)


def test_a_bound_in_the_last_frames_time_gets_that_frame_as_the_cards_do():
    """10 frames at 10 fps: [0.95, 1.0] starts within the last frame's 0.1 s (its start index rounds to 10, past the
    last frame): the cards sample frame 9, and so does the gateway; a bound from 1.0 on is outside the video."""
    data = noise_video(10, 64, 64, seed=7, fps=10)
    for bound in ((0.95, 1.0), (0.96, 1.0), (0.95, 0.951)):
        expected, _ = load_video(io.BytesIO(data), bound=bound, max_num=1, num_segments=2)
        tiles = decode(data, num_segments=2, bound=bound)
        assert torch.equal(torch.stack([build_transform(448)(Image.fromarray(t)) for t in tiles]), expected)
    refused(data, "lies outside the video", bound=(1.0, 1.2))


@pytest.mark.parametrize("codec", ["libx264", "libvpx-vp9"])
def test_threaded_decoding_gives_the_frames_of_one_thread(codec):
    """Frames FFmpeg decodes in parallel (a moving picture: every frame predicted from others) equal one thread's."""
    y, x = np.mgrid[0:360, 0:640]
    frames = [np.stack([(x + 4 * t) % 256, (y + 2 * t) % 256, ((x + y) // 2 + t) % 256], -1).astype(np.uint8)
              for t in range(60)]
    data = encode_video(frames, container="matroska", codec=codec, fps=30)
    assert np.array_equal(decode(data, threads=4), decode(data, threads=1))


def refused(data: bytes, *fragments, **kwargs) -> None:
    with pytest.raises(ApiError) as e:
        decode(data, **kwargs)
    assert e.value.status == 400
    for fragment in fragments:
        assert fragment in e.value.message, e.value.message


def test_bad_videos_are_400s():
    video = noise_video(30, 96, 64, seed=6)
    refused(b"", "empty")
    refused(b"this is not a video at all" * 20, "could not be read")
    refused(video[:len(video) // 3], "could not")  # truncated: the index at the end of an mp4 is gone
    refused(noise_video(30, 96, 64, seed=6, container="webm", codec="libvpx-vp9")[:200], "could not")
    refused(video, "30 frames, over the limit of 20", max_frames=20)
    refused(video, "96x64", max_pixels=96 * 64 - 1)
    refused(video, "lies outside the video", bound=(5.0, 9.0))


def test_huge_declared_frames_are_refused_before_decoding(tmp_path):
    """A small file declaring 8192x8192 frames is refused from its header: the probe (in a fresh process, so its peak
    memory is its own) allocates no 100 MB frame."""
    import subprocess
    import sys
    huge = tmp_path / "huge.mp4"
    huge.write_bytes(solid_video(8192, 8192))
    assert huge.stat().st_size < 1_000_000
    refused(huge.read_bytes(), "8192x8192", max_pixels=3840 * 2160)
    # VmHWM: this process's peak resident memory (ru_maxrss would carry the parent's peak over exec).
    code = ("import re, sys; from services.gateway.errors import ApiError; "
            "from services.gateway.video import probe_video; data = open(sys.argv[1], 'rb').read(); "
            "peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]); "
            "before = peak()\n"
            "try: probe_video(data, 3840 * 2160)\nexcept ApiError: pass\n"
            "print(peak() - before)")
    out = subprocess.run([sys.executable, "-c", code, str(huge)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 80 * 1024  # KiB; one decoded 8192x8192 frame is 96 MiB, the unguarded probe ~160
    assert decode(noise_video(10, 96, 64, seed=7)).shape[0] == 8  # and videos still decode

