"""r1v's PIL/numpy tiling against an independent transcription of InternVL-Chat's reference preprocessing.

The released Skywork-R1V / InternVL weights were trained on pixels made by InternVL-Chat's
`dynamic_preprocess` + `build_transform` (internvl_chat/internvl/train/dataset.py and the model cards'
`load_image`). r1v reimplements them without torchvision, so a silent drift (another grid on a tie, another
resample filter, normalisation in another order) would feed the frozen vision tower off-distribution pixels
without any error. This file keeps its own copy of the reference, written in the original's structure, and
sweeps grid choice over thousands of (size, min_tiles, max_tiles) cases and pixel values over 200+ cases.

torchvision cannot be imported here, so its three ops are emulated with what they do on a PIL input:
`T.Resize((s, s), BICUBIC)` calls `PIL.Image.resize((s, s), BICUBIC)` (a no-op when the size already matches),
`T.ToTensor()` is `uint8 HWC -> float32 CHW / 255`, and `T.Normalize` is `(x - mean) / std` in float32.
"""

from __future__ import annotations

import io
import itertools
import random

import numpy as np
import pytest
from PIL import Image

from r1v.model.tiling import (
    choose_grid,
    dynamic_tiles,
    image_to_pixel_values,
    load_image,
    normalize,
    normalize_array,
    tile_array,
    tile_count,
)

# ---------------------------------------------------------------------------------------------------------
# Reference, transcribed from InternVL-Chat (keep it independent of r1v.model.tiling: no shared helpers).
# ---------------------------------------------------------------------------------------------------------

REF_IMAGENET_MEAN = (0.485, 0.456, 0.406)
REF_IMAGENET_STD = (0.229, 0.224, 0.225)


def ref_find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def ref_target_ratios(min_num, max_num):
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    return sorted(target_ratios, key=lambda x: x[0] * x[1])


def ref_grid(orig_width, orig_height, min_num, max_num, image_size):
    aspect_ratio = orig_width / orig_height
    return ref_find_closest_aspect_ratio(
        aspect_ratio, ref_target_ratios(min_num, max_num), orig_width, orig_height, image_size
    )


def ref_dynamic_preprocess(image, min_num=1, max_num=6, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    target_aspect_ratio = ref_grid(orig_width, orig_height, min_num, max_num, image_size)
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
    resized_img = image.resize((target_width, target_height))  # PIL's default filter: BICUBIC for RGB
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        processed_images.append(resized_img.crop(box))
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images


def ref_transform(img, input_size):
    """build_transform(is_train=False): to RGB, T.Resize(BICUBIC), T.ToTensor, T.Normalize(ImageNet)."""
    img = img.convert("RGB") if img.mode != "RGB" else img
    if img.size != (input_size, input_size):  # torchvision returns the input unchanged when sizes match
        img = img.resize((input_size, input_size), Image.Resampling.BICUBIC)
    chw = np.array(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)  # ToTensor
    mean = np.array(REF_IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.array(REF_IMAGENET_STD, dtype=np.float32)[:, None, None]
    return (chw - mean) / std  # Normalize: tensor.sub_(mean).div_(std)


def ref_load_image(image_bytes, input_size=448, max_num=12, min_num=1):
    """The model cards' load_image, from bytes instead of a path."""
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    images = ref_dynamic_preprocess(
        image, min_num=min_num, image_size=input_size, use_thumbnail=True, max_num=max_num
    )
    return np.stack([ref_transform(t, input_size) for t in images])


# ---------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------


def _tie_cases(tile: int) -> list[tuple[int, int, int, int]]:
    """(w, h, min_tiles, max_tiles) whose aspect sits exactly on a tie, at an area below and above the rule.

    Two kinds: grids with the same ratio (1x1 / 2x2 / 3x3, 2x1 / 4x2 ...) and images whose aspect ratio is the
    midpoint of two different grid ratios, e.g. 3:2 between 1:1 and 2:1 when max_tiles < 6.
    """
    cases = []
    for max_t in (2, 3, 4, 5, 6, 8, 9, 12):
        grids = ref_target_ratios(1, max_t)
        ratios = sorted({(c, r) for c, r in grids}, key=lambda g: g[0] / g[1])
        for (c1, r1), (c2, r2) in itertools.combinations(ratios, 2):
            # midpoint (c1/r1 + c2/r2) / 2 = num / den, realised with integer sides
            num, den = c1 * r2 + c2 * r1, 2 * r1 * r2
            for scale in (1, 3, 10, 40):
                w, h = num * scale * tile // 16 or 1, den * scale * tile // 16 or 1
                if w * den == h * num:  # keep only exact midpoints
                    cases.append((w, h, 1, max_t))
        for c, r in grids:  # same-ratio ties: sizes on both sides of the half-area rule of larger grids
            for f in (0.3, 0.5, 0.72, 0.75, 1.0, 1.42, 1.5, 2.0, 2.2, 3.0):
                w, h = max(1, round(c * tile * f)), max(1, round(r * tile * f))
                if w * r == h * c:
                    cases.append((w, h, 1, max_t))
    return cases


def _extreme_and_tiny_cases() -> list[tuple[int, int, int, int]]:
    sizes = [
        (1, 1),
        (1, 2),
        (2, 1),
        (3, 7),
        (7, 3),
        (5, 5),
        (13, 1),
        (1, 13),
        (1, 1000),
        (1000, 1),
        (5000, 10),
        (10, 5000),
        (4000, 300),
        (300, 4000),
        (2, 999),
        (12000, 1000),
        (1000, 12000),
    ]
    return [(w, h, mn, mx) for w, h in sizes for mn, mx in ((1, 1), (1, 6), (1, 12), (2, 6), (3, 12), (4, 4))]


def _min_tiles_cases(rng: random.Random) -> list[tuple[int, int, int, int]]:
    out = []
    for _ in range(300):
        mx = rng.randint(2, 16)
        mn = rng.randint(2, mx)
        out.append((rng.randint(1, 3000), rng.randint(1, 3000), mn, mx))
    return out


def _random_cases(rng: random.Random, n: int) -> list[tuple[int, int, int, int]]:
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            w, h = rng.randint(1, 4000), rng.randint(1, 4000)
        else:  # log-uniform aspect ratios reach the extremes more often
            aspect = 2 ** rng.uniform(-6, 6)
            h = rng.randint(8, 1500)
            w = max(1, round(h * aspect))
        out.append((w, h, 1, rng.randint(1, 40)))
    return out


GRID_CASES = (
    _tie_cases(448)
    + _tie_cases(56)
    + _extreme_and_tiny_cases()
    + _min_tiles_cases(random.Random(1))
    + _random_cases(random.Random(2), 3000)
)


def _has_tie(w: int, h: int, mn: int, mx: int) -> bool:
    """Whether an exact tie with the running best occurs while scanning the reference's candidate order."""
    best = float("inf")
    for c, r in ref_target_ratios(mn, mx):
        d = abs(w / h - c / r)
        if d == best:
            return True
        best = min(best, d)
    return False


# ---------------------------------------------------------------------------------------------------------
# Grid choice
# ---------------------------------------------------------------------------------------------------------


def test_sweep_covers_ties_both_ways() -> None:
    """The sweep must actually exercise the tie rule, with the later grid both winning and losing."""
    tile = 448
    won = lost = 0
    for w, h, mn, mx in _tie_cases(tile):
        if not _has_tie(w, h, mn, mx):
            continue
        first = min(
            (g for g in ref_target_ratios(mn, mx)),
            key=lambda g: abs(w / h - g[0] / g[1]),
        )  # min() keeps the first of equal keys: the choice without the tie rule
        if ref_grid(w, h, mn, mx, tile) == first:
            lost += 1
        else:
            won += 1
    assert won >= 20 and lost >= 20, (won, lost)
    assert len(GRID_CASES) >= 3000


@pytest.mark.parametrize("tile", [448, 56, 14])
def test_grid_choice_matches_reference(tile: int) -> None:
    mismatches = [
        (w, h, mn, mx, choose_grid(w, h, tile, mn, mx), ref_grid(w, h, mn, mx, tile))
        for w, h, mn, mx in GRID_CASES
        if choose_grid(w, h, tile, mn, mx) != ref_grid(w, h, mn, mx, tile)
    ]
    assert not mismatches, f"{len(mismatches)} grid mismatches, first: {mismatches[:5]}"


def test_known_tie_outcomes() -> None:
    """Hand-checked ties, so that the reference itself is pinned down (not only r1v == reference)."""
    # 3:2 with max_tiles 2: |1.5 - 1| == |1.5 - 2|; 2x1 wins only above half of its 2 * 448^2 pixels.
    assert ref_grid(150, 100, 1, 2, 448) == choose_grid(150, 100, 448, 1, 2) == (1, 1)
    assert ref_grid(672, 448, 1, 2, 448) == choose_grid(672, 448, 448, 1, 2) == (2, 1)
    # square: 1x1, 2x2, 3x3 all exact; the largest grid whose half-area the image exceeds wins
    assert choose_grid(448, 448, 448) == (1, 1)
    assert choose_grid(800, 800, 448) == (2, 2)
    assert choose_grid(1000, 1000, 448) == (3, 3)
    # min_tiles removes 1x1: the first square grid keeps a tie it cannot lose by area
    assert ref_grid(10, 10, 2, 9, 448) == choose_grid(10, 10, 448, 2, 9) == (2, 2)


# ---------------------------------------------------------------------------------------------------------
# Pixel values
# ---------------------------------------------------------------------------------------------------------


def _noise_png(w: int, h: int, seed: int, mode: str = "RGB") -> bytes:
    """Smooth-ish noise (bicubic overshoot and clamping get exercised) saved losslessly."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(1, h // 4), max(1, w // 4), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.NEAREST)
    arr = np.array(img, dtype=np.int16) + rng.integers(-40, 40, size=(h, w, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _pixel_cases() -> list[tuple[int, int, int, int, int]]:
    """(w, h, min_tiles, max_tiles, tile): 200+ cases, mostly 28px tiles of small images (fast), some at 448.

    110 of them sit on an exact tie; the grid sweep covers large images, whose pixels would add nothing new.
    """
    rng = random.Random(3)
    cases = []
    ties = [c for c in _tie_cases(28) if c[0] * c[1] <= 120_000 and _has_tie(*c)]
    cases += [(w, h, mn, mx, 28) for w, h, mn, mx in rng.sample(ties, 110)]
    for w, h in [(1, 1), (2, 3), (1, 60), (60, 1), (300, 3), (3, 300), (13, 11)]:
        for mn, mx in ((1, 1), (1, 6), (1, 12), (2, 4)):
            cases.append((w, h, mn, mx, 28))
    for _ in range(90):
        mx = rng.randint(1, 12)
        mn = rng.choice([1, 1, 1, rng.randint(1, mx)])
        cases.append((rng.randint(1, 300), rng.randint(1, 300), mn, mx, 28))
    for w, h, mx in [
        (448, 448, 12),
        (800, 800, 12),
        (1000, 300, 6),
        (896, 448, 12),
        (640, 480, 6),
        (37, 1200, 12),
        (1024, 1000, 12),
        (672, 448, 2),
    ]:
        cases.append((w, h, 1, mx, 448))
    return cases


PIXEL_CASES = _pixel_cases()


def test_pixel_sweep_is_large_enough() -> None:
    assert len(PIXEL_CASES) >= 200


@pytest.mark.parametrize("chunk", range(4))
def test_pixel_values_match_reference(chunk: int) -> None:
    """Both r1v paths (PIL tiles + `normalize`, and the pipeline's uint8 `tile_array` + `normalize_array`,
    also written in place into a slice of a batch buffer sized by `tile_count`) against the reference."""
    worst = 0.0
    for k, (w, h, mn, mx, tile) in enumerate(PIXEL_CASES[chunk::4]):
        data = _noise_png(w, h, seed=k * 4 + chunk, mode="RGBA" if k % 7 == 3 else "RGB")
        ref = ref_load_image(data, input_size=tile, max_num=mx, min_num=mn)
        image = load_image(data)
        via_pil = normalize(dynamic_tiles(image, tile_size=tile, min_tiles=mn, max_tiles=mx))
        u8 = tile_array(image, tile_size=tile, min_tiles=mn, max_tiles=mx)
        via_array = normalize_array(u8)
        assert via_pil.shape == via_array.shape == ref.shape, (w, h, mn, mx, tile)
        assert via_pil.dtype == via_array.dtype == np.float32
        n = tile_count(image.width, image.height, tile, mn, mx)
        batch = np.zeros((n + 2, 3, tile, tile), dtype=np.uint8)
        tile_array(image, tile_size=tile, min_tiles=mn, max_tiles=mx, out=batch[1 : n + 1])
        np.testing.assert_array_equal(batch[1 : n + 1], u8)
        assert not batch[0].any() and not batch[n + 1].any()  # nothing written outside its slice
        if mn == 1:
            direct = image_to_pixel_values(data, tile_size=tile, max_tiles=mx)
            np.testing.assert_array_equal(direct, via_array)
        worst = max(worst, float(np.abs(via_pil - ref).max()), float(np.abs(via_array - ref).max()))
    # Same float32 ops in the same order: identical in practice; 1e-6 allows an equivalent rounding.
    assert worst <= 1e-6, worst


def test_without_thumbnail_both_paths_agree() -> None:
    image = load_image(_noise_png(300, 120, seed=5))
    tiles = dynamic_tiles(image, tile_size=28, max_tiles=6, use_thumbnail=False)
    u8 = tile_array(image, tile_size=28, max_tiles=6, use_thumbnail=False)
    cols, rows = choose_grid(300, 120, 28, 1, 6)
    assert len(tiles) == len(u8) == cols * rows > 1
    np.testing.assert_array_equal(normalize(tiles), normalize_array(u8))


def test_thumbnail_and_order_match_reference_at_448() -> None:
    """A 2x3 grid image: tile k of r1v is tile k of the reference, thumbnail last."""
    data = _noise_png(900, 1300, seed=11)
    ref = ref_load_image(data, input_size=448, max_num=6)
    ours = image_to_pixel_values(data, tile_size=448, max_tiles=6)
    assert ours.shape == (7, 3, 448, 448)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("size", [(1, 1), (37, 5), (1344, 896), (2100, 2100)])
def test_rgb_view_equals_numpy_copy(size) -> None:
    """The zero-copy pixel view (Pillow's Arrow export) and its fallback for images Pillow keeps in several
    memory blocks (2100 x 2100 x 4 bytes is over its 16 MB block) both give `np.asarray`'s pixels."""
    from r1v.model.tiling import _rgb_view

    w, h = size
    pixels = np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    view = _rgb_view(image)
    assert view.shape == (h, w, 3) and view.dtype == np.uint8
    np.testing.assert_array_equal(view, pixels)


@pytest.mark.parametrize(("rows", "cols", "tile"), [(1, 1, 28), (2, 3, 28), (3, 1, 448)])
def test_cut_tiles_word_path_equals_strided_copy(rows, cols, tile) -> None:
    """The tile cut reads Pillow's RGBX memory as 32-bit words; a contiguous HWC array takes numpy's strided
    copy. Both give the reference cut of every tile, channel by channel."""
    from r1v.model.tiling import _cut_tiles, _rgb_view

    pixels = np.random.default_rng(rows * 10 + cols).integers(0, 256, (rows * tile, cols * tile, 3), dtype=np.uint8)
    view = _rgb_view(Image.fromarray(pixels))
    assert view.strides[1:] == (4, 1)  # the word path is the one taken
    expected = np.stack([pixels[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile].transpose(2, 0, 1)
                         for r in range(rows) for c in range(cols)])
    for source in (view, pixels):
        grid = np.zeros((rows, cols, 3, tile, tile), dtype=np.uint8)
        _cut_tiles(source, grid)
        np.testing.assert_array_equal(grid.reshape(-1, 3, tile, tile), expected)
