"""Client videos: frames sampled as the model cards' `load_video` does, decoded with decord, one tile per frame.

Every client mistake (not a video, no video stream, too large, too many frames, a bound outside the video) is a 400
`ApiError`. PyAV reads the declared frame size first, with the decoder told to refuse larger frames, because opening
a container decodes a few frames (FFmpeg's stream probing): a small file declaring a huge picture must cost nothing.
decord then decodes the chosen frames, as the cards do, so the pixels are theirs.

Both are imported by the first video (in the worker that reads it): ~150 ms and ~55 MB of FFmpeg per process that
an image-only gateway and each of its preprocessing workers would otherwise carry.
"""
import hashlib
import io
import math

import numpy as np
from PIL import Image

from services.gateway.errors import bad_request
from services.gateway.tiling import in_threads, tile_image

DEFAULT_NUM_SEGMENTS = 8  # the cards' video example
_WHOLE_VIDEO = (-100_000, 100_000)  # the cards' bound when none is given


def frame_indices(num_frames: int, fps: float, num_segments: int,
                  bound: tuple[float, float] | None = None) -> list[int]:
    """The frames the cards' `get_index` picks: the middle of each of `num_segments` equal spans of the bound
    (Python's round for the bound, np.round for the spans, as there)."""
    start, end = bound or _WHOLE_VIDEO
    first = max(0, round(start * fps))
    last = min(round(end * fps), num_frames - 1)
    span = (last - first) / num_segments
    return [int(first + span / 2 + np.round(span * i)) for i in range(num_segments)]


def probe_video(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) the video's first video stream declares; refused beyond `max_pixels`."""
    if not data:
        raise bad_request("video data is empty")
    import av

    try:
        # max_pixels makes the probing decoder refuse a larger picture instead of allocating it.
        with av.open(io.BytesIO(data), stream_options=[{"max_pixels": str(max_pixels)}]) as container:
            if not container.streams.video:
                raise bad_request("video data has no video stream")
            codec = container.streams.video[0].codec_context
            width, height = codec.width, codec.height
    except av.FFmpegError as exc:
        raise bad_request(f"video data could not be read as a video: {exc}") from None
    if width <= 0 or height <= 0:
        raise bad_request(f"video has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise bad_request(f"video frames are {width}x{height} = {width * height} pixels, over the limit of "
                          f"{max_pixels} pixels")
    return width, height


def video_tiles(data: bytes, num_segments: int, bound: tuple[float, float] | None, *, max_frames: int,
                max_pixels: int, tile_size: int, use_thumbnail: bool, threads: int = 1) -> np.ndarray:
    """uint8 [num_segments, tile_size, tile_size, 3]: the chosen frames, each one tile (the cards' max_num=1),
    decoded and tiled on `threads` threads (FFmpeg's threaded decoding gives the frames its single thread gives, as
    in the cards: 8 frames of a 10 s 1280x720 H.264 video 457 -> 296 ms on 2 threads). Call `probe_video` first:
    it is what keeps huge frames from being decoded."""
    import decord

    try:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=threads)
        num_frames, fps = len(reader), reader.get_avg_fps()
    except (decord.DECORDError, RuntimeError) as exc:
        raise bad_request(f"video data could not be decoded: {_first_line(exc)}") from None
    if num_frames == 0:
        raise bad_request("video has no frames")
    if num_frames > max_frames:
        raise bad_request(f"video has {num_frames} frames, over the limit of {max_frames}")
    if not math.isfinite(fps) or fps <= 0:
        raise bad_request(f"video has no usable frame rate ({fps})")
    indices = frame_indices(num_frames, fps, num_segments, bound)
    # A bound must start before the video ends; one that starts within the last frame's time gets that frame, as the
    # cards' get_index gives it (its start index rounds past the last frame).
    if bound and (bound[0] * fps >= num_frames or not all(0 <= i < num_frames for i in indices)):
        raise bad_request(f"bound {list(bound)} lies outside the video ({num_frames} frames at {fps:g} fps)")
    try:
        frames = reader.get_batch(indices).asnumpy()
    except (decord.DECORDError, RuntimeError) as exc:
        raise bad_request(f"video frames could not be decoded: {_first_line(exc)}") from None
    if frames.shape[1] * frames.shape[2] > max_pixels:  # a stream whose frames grow past what it declared
        raise bad_request(f"video frames are over the limit of {max_pixels} pixels")

    def tile(frame: np.ndarray) -> np.ndarray:
        return tile_image(Image.fromarray(frame), max_num=1, use_thumbnail=use_thumbnail, tile_size=tile_size)

    return np.concatenate(in_threads(tile, frames, threads))


def tile_hash(tile: np.ndarray) -> str:
    """What names a frame's embeddings in the cache: the tile's pixels (prefixed, so it never equals the hash of
    an encoded image's bytes)."""
    return "tile:" + hashlib.sha256(tile.tobytes()).hexdigest()


def _first_line(exc: Exception) -> str:
    # decord's errors carry a C++ stack trace after the first line.
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
