"""InternVL dynamic-resolution tiling ("dynamic_preprocess" in the model cards).

An image is resized to a grid of `tile_size` x `tile_size` tiles whose aspect ratio is
closest to the image's, cut into those tiles row by row, and - when the grid has more
than one tile - followed by a thumbnail of the whole image. The result must be
pixel-identical to the model cards' preprocessing, because the model was trained on
exactly those pixels; every choice below (candidate order, tie rule, resampling filter)
reproduces that behaviour. Normalisation to float happens downstream.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Callable, Iterable, TypeVar

import numpy as np
from PIL import Image

try:
    from services.gateway import _resample
except ImportError:  # not built on this platform: Pillow's own (slower) resize, the same pixels
    _resample = None

TILE_SIZE = 448
T, R = TypeVar("T"), TypeVar("R")


@lru_cache(maxsize=64)
def _candidate_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) with min_num <= cols * rows <= max_num, in the cards' order.

    The cards collect the grids into a Python set and stable-sort it by area, so grids
    of equal area keep the set's iteration order, which depends on the order the grids
    were inserted. That order only decides exact ties between two equal-area grids
    (possible only when min_num > 1, e.g. 1x2 vs 2x1 for a 5:4 image), but we insert in
    the same order anyway so the choice matches for every (min_num, max_num).
    """
    grids: set[tuple[int, int]] = set()
    for limit in range(min_num, max_num + 1):
        for cols in range(1, limit + 1):
            for rows in range(1, limit + 1):
                if min_num <= cols * rows <= max_num:
                    grids.add((cols, rows))
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def choose_grid(width: int, height: int, min_num: int = 1, max_num: int = 12,
                tile_size: int = TILE_SIZE) -> tuple[int, int]:
    """Return the tile grid `(cols, rows)` for an image of `width` x `height` pixels.

    Picks the grid whose cols/rows ratio is closest to width/height, scanning grids by
    increasing tile count. On an exact tie the larger grid wins only if the image has
    more than half the pixels of that grid (so small images are not blown up into many
    tiles that carry no extra detail).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 1 <= min_num <= max_num:
        raise ValueError(f"need 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")

    # Same float arithmetic as the cards (width / height, cols / rows), so that ties
    # are detected identically.
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in _candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and 2 * width * height > tile_size * tile_size * cols * rows:
            # Integer form of `area > 0.5 * tile_size**2 * cols * rows`; exact either way.
            best = (cols, rows)
    return best


def tile_count(width: int, height: int, max_num: int = 12, min_num: int = 1, use_thumbnail: bool = True,
               tile_size: int = TILE_SIZE) -> int:
    """How many tiles `tile_image` makes of an image of this size (known from its header, without decoding it)."""
    cols, rows = choose_grid(width, height, min_num, max_num, tile_size)
    return cols * rows + (use_thumbnail and cols * rows > 1)


def tile_image(image: Image.Image, max_num: int = 12, min_num: int = 1,
               use_thumbnail: bool = True, tile_size: int = TILE_SIZE, threads: int = 1) -> np.ndarray:
    """Cut `image` into InternVL tiles.

    Returns a uint8 array `[n_tiles, tile_size, tile_size, 3]` (RGB): the grid tiles in
    row-major order, then (if `use_thumbnail` and the grid has more than one tile) the
    whole image resized to one tile. Non-RGB images are converted with
    `Image.convert("RGB")` as the cards do: alpha is dropped, not blended onto a
    background, and palette / greyscale / CMYK images take PIL's standard conversion.
    `threads` > 1 spreads each resize over that many threads (`resize`).
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    pixels = np.asarray(rgb)
    cols, rows = choose_grid(rgb.width, rgb.height, min_num, max_num, tile_size)
    blocks = cols * rows
    with_thumbnail = use_thumbnail and blocks > 1

    # One bicubic resize of the whole image to the grid size (not a resize per tile):
    # tiles then share seams exactly as in the reference.
    grid = resize(pixels, (cols * tile_size, rows * tile_size), threads)

    tiles = np.empty((blocks + with_thumbnail, tile_size, tile_size, 3), dtype=np.uint8)
    for k in range(blocks):
        row, col = divmod(k, cols)
        tiles[k] = grid[row * tile_size:(row + 1) * tile_size, col * tile_size:(col + 1) * tile_size]
    if with_thumbnail:
        # Resized from the original image, not from the grid, as in the reference.
        tiles[blocks] = resize(pixels, (tile_size, tile_size), threads)
    return tiles


def resize(pixels: np.ndarray, size: tuple[int, int], threads: int = 1) -> np.ndarray:
    """`image.resize(size, BICUBIC)` of an RGB image's (height, width, 3) uint8 pixels, pixel for pixel, ~5x faster.

    `_resample` (C, built with the package) runs Pillow 13.0's two fixed-point passes with the same coefficients and
    integer sums, vectorised; without it (a platform where it did not build) this is Pillow's own resize. Each pass's
    output rows are split over `threads` threads (the GIL is released while they compute). The passes run in
    Pillow's order, which rounds between them: horizontal first, unless the height shrinks by more than twice what
    the width does (Resample.c). tests/test_tiling.py holds both ways equal to Pillow.
    """
    if _resample is None:
        return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC))
    (height, width), (new_width, new_height) = pixels.shape[:2], size
    vertical_first = 0 < height - new_height and 2 * (width - new_width) < height - new_height
    first = (_resample.vertical, (new_height, width)) if vertical_first else (_resample.horizontal, (height, new_width))
    second = (_resample.horizontal if vertical_first else _resample.vertical, (new_height, new_width))
    for run, shape in (first, second):
        if shape != pixels.shape[:2]:
            pixels = _pass(run, pixels, shape, threads)
    return pixels


def _pass(run: Callable, src: np.ndarray, shape: tuple[int, int], threads: int) -> np.ndarray:
    """One `_resample` pass into a new (height, width, 3) array, its rows split over `threads` threads."""
    out = np.empty(shape + (3,), np.uint8)
    in_threads(lambda rows: run(src, out, *rows), _bands(shape[0], threads), threads)
    return out


def in_threads(fn: Callable[[T], R], items: Iterable[T], threads: int) -> list[R]:
    """[fn(item) for item in items], on `threads` threads when more than one: Pillow and `_resample` compute
    without the GIL."""
    if threads <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(threads, thread_name_prefix="pillow") as pool:
        return list(pool.map(fn, items))


def _bands(length: int, parts: int) -> list[tuple[int, int]]:
    step = -(-length // parts)
    return [(start, min(length, start + step)) for start in range(0, length, step)]

