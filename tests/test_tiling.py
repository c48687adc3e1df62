"""services/gateway/tiling.py must reproduce the model cards' dynamic_preprocess pixel for pixel."""
import os
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.gateway import tiling
from services.gateway.tiling import choose_grid, resize, tile_image
from tests.reference_preprocess import (
    IMAGENET_MEAN, IMAGENET_STD, dynamic_preprocess, find_closest_aspect_ratio,
    reference_pixel_values, reference_tiles,
)


def noise_image(width, height, mode="RGB", seed=0):
    """Deterministic random noise: any resampling difference changes pixels."""
    rng = np.random.default_rng(seed + 7919 * width + height)
    if mode in ("RGB", "RGBA"):
        return Image.fromarray(rng.integers(0, 256, (height, width, len(mode)), dtype=np.uint8))
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
    if mode == "LA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 2), dtype=np.uint8)).convert("RGBA").convert("LA")
    if mode in ("P", "P-transparency"):
        image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())  # L -> P
        if mode == "P-transparency":
            image.info["transparency"] = 3
        assert image.mode == "P"
        return image
    if mode == "CMYK":
        return Image.frombytes("CMYK", (width, height), rng.integers(0, 256, width * height * 4, dtype=np.uint8).tobytes())
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (height, width), dtype=bool))
    raise AssertionError(mode)


# (width, height): odd sizes, extreme aspect ratios, exact tile multiples and the tie rule.
SIZES = [
    (1, 1), (37, 501), (800, 600), (1000, 200), (300, 1200), (2000, 1000), (64, 48),
    (448, 448), (449, 447), (1920, 1080),
    (2100, 700), (600, 200),   # 3:1: (3,1) ties (6,2); the 12-tile grid wins only for the big image
    (700, 2100), (200, 600),   # 1:3, same tie transposed
    (5, 4000), (4000, 5),      # aspect beyond every grid
]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("max_num", [1, 6, 12])
@pytest.mark.parametrize("width,height", SIZES)
def test_tiles_match_reference(width, height, max_num, threads):
    image = noise_image(width, height)
    tiles = tile_image(image, max_num=max_num, threads=threads)
    expected = reference_tiles(image, max_num=max_num)
    assert tiles.dtype == np.uint8 and tiles.shape[1:] == (448, 448, 3)
    assert tiles.shape == expected.shape
    assert np.array_equal(tiles, expected)


def _sizes(count: int, seed: int) -> list[tuple[int, int, int, int]]:
    """(width, height) -> (new width, new height), every mix of growing, keeping and shrinking each side."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        w, h = rng.randint(1, 700), rng.randint(1, 700)
        scale = [rng.uniform(0.05, 0.95), 1.0, rng.uniform(1.05, 4.0)]
        out.append((w, h, max(1, round(w * scale[i % 3])), max(1, round(h * scale[i // 3 % 3]))))
    return out


# The boundaries of Pillow's pass order (vertical first iff the height shrinks by more than twice the width) and of
# its filter's reach (a 4000-pixel side to 448: 37 taps per output pixel), beside the random mixes.
EDGES = [(300, 700, 200, 499), (300, 700, 200, 500), (300, 700, 200, 501), (700, 300, 499, 200), (5, 4000, 448, 448),
         (4000, 5, 448, 448), (4000, 3000, 448, 448), (1, 1, 448, 448), (448, 448, 1, 1), (3, 2, 2, 3)]


@pytest.mark.parametrize("width,height,new_width,new_height", _sizes(45, seed=3) + EDGES)
def test_a_resize_equals_pillows_on_any_number_of_threads(width, height, new_width, new_height):
    image = noise_image(width, height)
    want = np.asarray(image.resize((new_width, new_height), Image.Resampling.BICUBIC))
    for threads in (1, 2, 3, 7):
        got = resize(np.asarray(image), (new_width, new_height), threads)
        assert got.dtype == np.uint8 and np.array_equal(got, want), threads


def test_the_vectorised_resize_is_built():
    """Without it every test above compares Pillow with itself: the project's environment must build it."""
    assert tiling._resample is not None


def test_without_the_extension_pillow_resizes(monkeypatch):
    image = noise_image(301, 97)
    want = resize(np.asarray(image), (448, 448))
    monkeypatch.setattr(tiling, "_resample", None)
    assert np.array_equal(resize(np.asarray(image), (448, 448), threads=3), want)
    assert np.array_equal(tile_image(image), reference_tiles(image))


SANITIZED = """
import random, sys
import numpy as np
from PIL import Image
sys.path.insert(0, sys.argv[1])
import _resample

rng, r = np.random.default_rng(1), random.Random(1)
for w, h, nw, nh in [(1, 1, 448, 448), (448, 448, 1, 1), (2, 3000, 448, 448), (3000, 2, 448, 448)] + [
        (r.randint(1, 200), r.randint(1, 200), r.randint(1, 300), r.randint(1, 300)) for _ in range(100)]:
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(a).resize((nw, nh), Image.Resampling.BICUBIC))
    vertical_first = 0 < h - nh and 2 * (w - nw) < h - nh
    for run, shape in ([(_resample.vertical, (nh, w)), (_resample.horizontal, (nh, nw))] if vertical_first else
                       [(_resample.horizontal, (h, nw)), (_resample.vertical, (nh, nw))]):
        if shape != a.shape[:2]:
            out = np.empty(shape + (3,), np.uint8)
            cuts = sorted({0, shape[0], r.randint(0, shape[0]), r.randint(0, shape[0])})  # bands, as threads run
            for start, stop in zip(cuts, cuts[1:]):
                run(a, out, start, stop)
            a = out
    assert np.array_equal(a, want), (w, h, nw, nh)
print("ok")
"""


def test_the_extension_is_memory_safe_under_sanitizers(tmp_path):
    """Hand-written C: built with AddressSanitizer and UBSan and run over odd sizes and uneven row bands, any read or
    write outside a buffer (the passes copy 4-byte pixels) or undefined arithmetic aborts."""
    libs = [subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
            for lib in ("libasan.so", "libubsan.so")]
    module = tmp_path / ("_resample" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["gcc", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                    "-fno-omit-frame-pointer", "-shared", "-fPIC", "-I" + sysconfig.get_paths()["include"],
                    str(Path(tiling.__file__).with_name("_resample.c")), "-o", str(module)], check=True)
    out = subprocess.run([sys.executable, "-c", SANITIZED, str(tmp_path)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "LD_PRELOAD": ":".join(libs),
                                           "ASAN_OPTIONS": "detect_leaks=0"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.parametrize("args,message", [
    ((np.zeros((4, 4), np.uint8), np.zeros((4, 2, 3), np.uint8), 0, 4), "shaped"),
    ((np.zeros((4, 4, 4), np.uint8), np.zeros((4, 2, 3), np.uint8), 0, 4), "shaped"),
    ((np.zeros((4, 4, 3), np.float32), np.zeros((4, 2, 3), np.uint8), 0, 4), "uint8"),
    ((np.zeros((4, 8, 3), np.uint8)[:, ::2], np.zeros((4, 2, 3), np.uint8), 0, 4), "contiguous"),
    ((np.zeros((0, 4, 3), np.uint8), np.zeros((4, 2, 3), np.uint8), 0, 4), "non-empty"),
    ((np.zeros((4, 4, 3), np.uint8), np.zeros((5, 2, 3), np.uint8), 0, 4), "same height"),
    ((np.zeros((4, 4, 3), np.uint8), np.zeros((4, 2, 3), np.uint8), 0, 5), "outside"),
    ((np.zeros((4, 4, 3), np.uint8), np.zeros((4, 2, 3), np.uint8), 3, 2), "outside"),
    ((np.zeros((4, 4, 3), np.uint8), np.zeros((4, 2, 3), np.uint8), -1, 2), "outside"),
])
def test_the_extension_refuses_what_it_cannot_resize(args, message):
    with pytest.raises((ValueError, BufferError), match=message):
        tiling._resample.horizontal(*args)


def test_the_extension_writes_only_into_a_writable_array():
    out = np.zeros((2, 4, 3), np.uint8)
    out.flags.writeable = False
    with pytest.raises((ValueError, BufferError)):
        tiling._resample.vertical(np.zeros((4, 4, 3), np.uint8), out, 0, 2)
    with pytest.raises(ValueError, match="same width"):
        tiling._resample.vertical(np.zeros((4, 4, 3), np.uint8), np.zeros((2, 5, 3), np.uint8), 0, 2)


# Section 3.1 of INTERNVL_REFERENCE.md, plus the tie-rule cases.
@pytest.mark.parametrize("width,height,grid,n_tiles", [
    (800, 600, (4, 3), 13),
    (1000, 200, (5, 1), 6),
    (300, 1200, (1, 4), 5),
    (2000, 1000, (4, 2), 9),
    (64, 48, (4, 3), 13),
    (448, 448, (1, 1), 1),
    (2100, 700, (6, 2), 13),
    (600, 200, (3, 1), 4),
    (700, 2100, (2, 6), 13),
    (200, 600, (1, 3), 4),
])
def test_documented_tile_counts(width, height, grid, n_tiles):
    assert choose_grid(width, height, 1, 12, 448) == grid
    assert tile_image(noise_image(width, height)).shape[0] == n_tiles


def test_max_num_1_is_a_single_resize():
    image = noise_image(1000, 200)
    tiles = tile_image(image, max_num=1)
    assert tiles.shape == (1, 448, 448, 3)
    assert np.array_equal(tiles[0], np.asarray(image.resize((448, 448), Image.BICUBIC)))


@pytest.mark.parametrize("mode", ["RGBA", "P", "P-transparency", "L", "LA", "CMYK", "1"])
@pytest.mark.parametrize("width,height", [(800, 600), (37, 501)])
def test_modes_converted_like_reference(mode, width, height):
    image = noise_image(width, height, mode)
    assert image.mode == mode.split("-")[0]
    tiles = tile_image(image)
    assert np.array_equal(tiles, reference_tiles(image))


def test_alpha_is_dropped_not_blended():
    rgba = np.zeros((600, 800, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red, fully transparent: blending onto white would change it
    tiles = tile_image(Image.fromarray(rgba))
    assert (tiles[..., 0] == 200).all() and (tiles[..., 1:] == 0).all()


@pytest.mark.parametrize("min_num,max_num,width,height", [
    (2, 2, 1250, 1000),   # 1x2 and 2x1 tie exactly: decided by the cards' set order
    (2, 6, 448, 448),
    (3, 12, 1000, 200),
    (4, 4, 900, 900),
])
def test_min_num_matches_reference(min_num, max_num, width, height):
    image = noise_image(width, height)
    expected = reference_tiles(image, max_num=max_num, min_num=min_num)
    assert np.array_equal(tile_image(image, max_num=max_num, min_num=min_num), expected)


def _reference_ratios(min_num, max_num):
    """The cards' candidate list (set, then sorted by area), as built in dynamic_preprocess."""
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if
        i * j <= max_num and i * j >= min_num)
    return sorted(target_ratios, key=lambda x: x[0] * x[1])


def test_choose_grid_matches_reference_sweep():
    """Grid choice only (no pixels) over many sizes, including exact grid ratios around the
    tie threshold, and many (min_num, max_num)."""
    rnd = random.Random(1234)
    sizes = [(rnd.randint(1, 5000), rnd.randint(1, 5000)) for _ in range(1500)]
    sizes += [(rnd.randint(1, 60), rnd.randint(1, 60)) for _ in range(300)]
    for cols in range(1, 13):
        for rows in range(1, 13):
            for scale in (1, 7, 64, 100, 150, 224, 225, 300, 317, 448, 449):
                sizes.append((cols * scale, rows * scale))
    limits = [(1, 1), (1, 6), (1, 12), (1, 24), (1, 40), (2, 2), (2, 3), (3, 3), (4, 4), (2, 12), (5, 9)]
    for min_num, max_num in limits:
        ratios = _reference_ratios(min_num, max_num)
        for width, height in sizes:
            expected = find_closest_aspect_ratio(width / height, ratios, width, height, 448)
            assert choose_grid(width, height, min_num, max_num, 448) == expected, (width, height, min_num, max_num)


def test_no_thumbnail_option():
    image = noise_image(800, 600)
    tiles = tile_image(image, use_thumbnail=False)
    expected = dynamic_preprocess(image, image_size=448, use_thumbnail=False, max_num=12)
    assert np.array_equal(tiles, np.stack([np.asarray(t) for t in expected]))


def test_normalised_tiles_equal_reference_pixel_values():
    """uint8 tiles -> ToTensor + Normalize gives the cards' pixel_values bit for bit."""
    image = noise_image(1000, 200)
    tiles = torch.from_numpy(tile_image(image)).permute(0, 3, 1, 2).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = reference_pixel_values(image)
    assert expected.shape == (6, 3, 448, 448) and expected.dtype == torch.float32
    assert torch.equal((tiles - mean) / std, expected)


def test_input_image_not_modified():
    image = noise_image(801, 599, "RGBA")
    before = np.asarray(image).copy()
    tile_image(image)
    assert image.mode == "RGBA" and np.array_equal(np.asarray(image), before)


@pytest.mark.parametrize("kwargs", [dict(max_num=0), dict(min_num=3, max_num=2), dict(min_num=0)])
def test_invalid_limits_rejected(kwargs):
    with pytest.raises(ValueError):
        tile_image(noise_image(10, 10), **kwargs)


def test_zero_size_rejected():
    with pytest.raises(ValueError):
        choose_grid(0, 10)
