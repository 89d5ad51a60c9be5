import io

import numpy as np
import pytest
from PIL import Image

from r1v.model import choose_grid, dynamic_tiles, image_to_pixel_values, load_image, normalize
from r1v.model.tiling import IMAGENET_MEAN, IMAGENET_STD


def _png(width: int, height: int, color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("size", "grid"),
    [
        ((448, 448), (1, 1)),  # exact tie with 2x2 and 3x3: area too small, the first (1x1) stays
        ((800, 800), (2, 2)),  # tie: area > half of 2x2's pixels, so 2x2 wins, but not > half of 3x3's
        ((1000, 1000), (3, 3)),  # tie won by 3x3 too
        ((896, 448), (2, 1)),  # 4x2 ties but the image is too small for it
        ((2000, 1000), (4, 2)),  # ... and large enough here
        ((1000, 300), (3, 1)),  # closest ratio; 6x2 ties but is too large
        ((300, 1000), (1, 3)),
        ((5000, 100), (12, 1)),  # extreme aspect ratio: widest grid allowed
    ],
)
def test_choose_grid_known_cases(size: tuple[int, int], grid: tuple[int, int]) -> None:
    assert choose_grid(*size, tile_size=448) == grid


def test_choose_grid_limits() -> None:
    assert choose_grid(1000, 1000, 448, max_tiles=6) == (2, 2)
    assert choose_grid(448, 448, 448, min_tiles=2, max_tiles=4) == (2, 2)  # 1x1 excluded, first square kept
    with pytest.raises(ValueError, match="min_tiles=3, max_tiles=2"):
        choose_grid(10, 10, 448, min_tiles=3, max_tiles=2)
    with pytest.raises(ValueError, match="0x10"):
        choose_grid(0, 10, 448)


@pytest.mark.parametrize(("size", "n_tiles"), [((56, 56), 1), ((125, 125), 10), ((112, 56), 3)])
def test_tile_count_and_order(size: tuple[int, int], n_tiles: int) -> None:
    image = Image.new("RGB", size)
    image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))  # left half red
    tiles = dynamic_tiles(image, tile_size=56)
    cols, rows = choose_grid(*size, tile_size=56)
    assert len(tiles) == cols * rows + (cols * rows > 1) == n_tiles
    assert all(t.size == (56, 56) for t in tiles)
    if cols > 1:  # row-major: the first tile is top-left (red), the last grid tile bottom-right (black)
        assert tiles[0].getpixel((5, 5)) == (255, 0, 0)
        assert tiles[cols * rows - 1].getpixel((50, 50)) == (0, 0, 0)
    assert len(dynamic_tiles(image, tile_size=56, use_thumbnail=False)) == cols * rows


def test_normalize_matches_imagenet_formula() -> None:
    arr = normalize([Image.new("RGB", (8, 8), (10, 200, 30))] * 2)
    assert arr.shape == (2, 3, 8, 8) and arr.dtype == np.float32
    expected = (np.array([10, 200, 30], np.float32) / np.float32(255) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_array_equal(arr[1, :, 3, 3], expected)


def test_image_to_pixel_values_shape() -> None:
    pv = image_to_pixel_values(_png(125, 125), tile_size=56, max_tiles=12)
    assert pv.shape == (10, 3, 56, 56) and pv.dtype == np.float32
    assert image_to_pixel_values(_png(125, 125), tile_size=56, max_tiles=1).shape == (1, 3, 56, 56)


def test_load_image_applies_exif_and_converts() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: displayed after a 90 degree turn
    buf = io.BytesIO()
    Image.new("RGB", (40, 20)).save(buf, "JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (20, 40)
    buf = io.BytesIO()
    Image.new("LA", (4, 4)).save(buf, "PNG")
    assert load_image(buf.getvalue()).mode == "RGB"
    with pytest.raises(ValueError, match="cannot decode image"):
        load_image(b"not an image")
