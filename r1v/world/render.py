"""Images of the miniature world: a labelled 2 x 2 grid `A7 B7 / C6 D3`, one letter-and-digit per quadrant.

One 56-pixel tile is one vision-tower input; after the tower's 14-pixel patches and InternVL's pixel shuffle
it becomes a 2 x 2 grid of image tokens, one per quadrant. So each labelled digit has an image token of its
own, as it has one text token (`A7`) in the written form `A7B7C6D3`.
"""

from __future__ import annotations

import io
import random
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

TILE = 56
CELL = 28


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render_digits(digits: tuple[int, ...], rng: random.Random, size: int = TILE) -> Image.Image:
    """A light, noisy background with each digit drawn in its quadrant: jittered, in a random dark colour."""
    bg = np.array([rng.randint(170, 255) for _ in range(3)], dtype=np.int16)
    noise = np.random.default_rng(rng.getrandbits(32)).integers(-25, 26, (size, size, 3))
    img = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for k, symbol in enumerate(cell_symbols(digits)):
        if not symbol:
            continue
        font = _font(rng.randint(13, 17))
        x0, y0 = (k % 2) * CELL, (k // 2) * CELL
        left, top, right, bottom = draw.textbbox((0, 0), symbol, font=font)
        w, h = right - left, bottom - top
        x = x0 + rng.randint(0, max(0, CELL - w - 1)) - left
        y = y0 + rng.randint(0, max(0, CELL - h - 1)) - top
        draw.text((x, y), symbol, fill=tuple(rng.randint(0, 110) for _ in range(3)), font=font)
    return img


def blurred(img: Image.Image, radius: float) -> Image.Image:
    """`img` under a Gaussian blur of `radius` pixels (0: the image itself)."""
    return img.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else img


def cell_symbols(digits: tuple[int, ...]) -> list[str]:
    """What each of the 4 cells shows, in reading order."""
    return [f"{k}{d}" for k, d in zip("ABCD", digits, strict=True)]


def png_bytes(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def tile_array(img: Image.Image) -> np.ndarray:
    """uint8 [3, H, W], the layout r1v's pipeline hands to the vision tower."""
    return np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).copy()
