"""The cue-based scores order crafted inputs as documented in r1v.distill.cues."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from r1v.distill.cues import decode_image, image_cues, images_cues, integration_cues, laplacian_variance, question_cues


def checkerboard(w: int, h: int, square: int = 8) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    a = (((x // square) + (y // square)) % 2 * 255).astype(np.uint8)
    return Image.fromarray(a, "L").convert("RGB")


def test_laplacian_of_flat_and_sharp_images() -> None:
    assert laplacian_variance(Image.new("RGB", (64, 64), (128, 128, 128))) == 0.0
    assert laplacian_variance(Image.new("RGB", (2, 2))) == 0.0  # too small for the kernel
    assert laplacian_variance(checkerboard(64, 64)) > 1000


def test_blurred_scores_below_sharp() -> None:
    sharp = checkerboard(448, 448)
    soft = sharp.filter(ImageFilter.GaussianBlur(3))
    s, b = image_cues(sharp), image_cues(soft)
    assert b["lapvar"] < s["lapvar"] / 10
    assert b["blur"] < s["blur"] and b["cue"] < s["cue"]
    assert s["res"] == b["res"] == 1.0 and s["aspect"] == b["aspect"] == 1.0  # only sharpness differs


def test_tiny_scores_below_large_and_strip_below_square() -> None:
    tiny, large = image_cues(checkerboard(32, 32, 4)), image_cues(checkerboard(448, 448))
    assert tiny["res"] == pytest.approx(32 / 448) and large["res"] == 1.0 and tiny["cue"] < large["cue"]
    strip = image_cues(checkerboard(448, 28))
    assert strip["aspect"] == pytest.approx((28 / 448) / 0.25) and strip["cue"] < large["cue"]
    assert images_cues([])["cue"] == 0.0  # no image: nothing is necessary to look at
    both = images_cues([checkerboard(448, 448), checkerboard(32, 32, 4)])
    assert both["res"] == pytest.approx((1 + 32 / 448) / 2)


def test_decode_rejects_truncated_bytes() -> None:
    buf = io.BytesIO()
    checkerboard(64, 64).save(buf, "PNG")
    assert decode_image(buf.getvalue()).size == (64, 64)
    with pytest.raises(Exception):  # noqa: B017  (PIL raises OSError or UnidentifiedImageError)
        decode_image(buf.getvalue()[:40])


def test_longer_multi_operator_question_scores_higher_on_s_t() -> None:
    short = question_cues("<image>\nWhat is 3 + 4?")
    hard = question_cues("<image>\nGiven the digits in the image, compute the sum of the top two, multiply it by "
                         "the difference of the bottom two, then divide by 3. If the result is at least 10, find "
                         "x such that 2x - 5 = result; otherwise report result^2.")
    assert short["ops"] == 1 and hard["ops"] >= 6
    assert hard["words"] > 3 * short["words"] and hard["reason"] > short["reason"]
    assert hard["cue"] > short["cue"]
    assert question_cues("a well-known self-evident fact")["ops"] == 0  # hyphens inside words are not minus


def test_why_how_scores_above_what_where_on_s_i() -> None:
    plain = [integration_cues(q) for q in ("What is this?", "Where is the cat?", "Which color is the car?")]
    causal = [integration_cues(q) for q in (
        "Why does the block on the left of the ramp slide faster than the ball below it?",
        "How does the force on the lever change the angle between the beam and the wall?",
        "Explain why the circuit's current drops when the resistance next to the battery rises.")]
    assert all(p["what_where"] == 1 and p["causal"] == 0 for p in plain)
    assert all(c["causal"] == 1 and c["what_where"] == 0 for c in causal)
    assert max(p["cue"] for p in plain) < min(c["cue"] for c in causal)
    assert integration_cues("How many apples are there?")["causal"] == 0  # counting, not causal
    # several objects in spatial relations and co-occurring domain terms raise a what-question above a plain one
    rich = integration_cues("What is the area of the triangle to the left of the circle, above the square?")
    assert rich["spatial"] > 0 and rich["domain"] == 1.0 and rich["cue"] > max(p["cue"] for p in plain)
