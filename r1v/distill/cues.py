"""Measured cues of QDAM and VTIA (METHOD.md section 4): what can be read off a sample without a judge.

Every function returns its components and a combined score in [0, 1]; higher means "worth a longer chain"
(a clear, necessary image; a hard, well-posed question; tight vision-text integration). Documented orderings,
which tests/distill/test_cues.py checks on crafted inputs:

- image: a sharp image > its blur (Laplacian variance); a large image > a tiny one (resolution); a square image >
  an extreme strip (aspect); no image at all scores 0 (nothing to look at: the image cannot be necessary);
- question (S_t): a long question with several operators and reasoning verbs > a short plain one;
- integration (S_I): a causal why/how question, several objects in spatial relations, co-occurring domain terms
  > a plain what/where identification question.

Why cues at all: the paper's QDAM/VTIA are judge scores, but a judge is not always at hand (the miniature world,
tests, a first pass); the cues are cheap, deterministic and keep the components inspectable next to the judge.
"""

from __future__ import annotations

import io
import math
import re

import numpy as np
from PIL import Image

from r1v.distill.config import ImageCueParams, TextCueParams
from r1v.model.tokens import IMAGE_MARKER

MAX_SIDE = 2048
"""Images larger than this are shrunk (keeping aspect) before the Laplacian: the cost stays bounded and the
variance of a huge photo is measured at a scale comparable to the images a VLM sees."""


def decode_image(data: bytes) -> Image.Image:
    """The encoded image as RGB; raises on truncated or unknown bytes (the caller quarantines the row)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def laplacian_variance(img: Image.Image) -> float:
    """Variance of the 4-neighbour Laplacian of the grayscale image (0..255): low for blurred or flat images."""
    if max(img.size) > MAX_SIDE:
        img = img.copy()
        img.thumbnail((MAX_SIDE, MAX_SIDE))
    g = np.asarray(img.convert("L"), dtype=np.float64)
    if g.shape[0] < 3 or g.shape[1] < 3:
        return 0.0
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


def image_cues(img: Image.Image, p: ImageCueParams = ImageCueParams()) -> dict[str, float]:
    """Components of one image: `lapvar` (raw), `blur`, `res`, `aspect` (each 0..1) and `cue` (their weighted
    mean)."""
    w, h = img.size
    v = laplacian_variance(img)
    blur = v / (v + p.blur_ref) if v > 0 else 0.0
    res = min(1.0, math.sqrt(w * h) / p.target_side)
    aspect = min(1.0, (min(w, h) / max(w, h)) / p.aspect_ok) if max(w, h) else 0.0
    cue = (p.w_blur * blur + p.w_res * res + p.w_aspect * aspect) / (p.w_blur + p.w_res + p.w_aspect)
    return {"lapvar": v, "blur": blur, "res": res, "aspect": aspect, "cue": cue}


def images_cues(images: list[Image.Image], p: ImageCueParams = ImageCueParams()) -> dict[str, float]:
    """A row's images: the mean of each component over them (all 0 when the row has none)."""
    if not images:
        return {"lapvar": 0.0, "blur": 0.0, "res": 0.0, "aspect": 0.0, "cue": 0.0}
    each = [image_cues(im, p) for im in images]
    return {k: float(np.mean([e[k] for e in each])) for k in each[0]}


# --- text -----------------------------------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?|\d+(?:\.\d+)?")
_OP_SYMBOLS = re.compile(r"[+*/^=<>×÷·√∑∏∫≤≥≠±%]|(?<![A-Za-z])-(?![A-Za-z])")
_OP_LATEX = re.compile(r"\\(?:frac|sqrt|sum|prod|int|times|cdot|div|le|ge|leq|geq|neq|pm|log|ln|sin|cos|tan)\b")
_OP_WORDS = re.compile(r"\b(?:plus|minus|times|multiply|multiplied|divide|divided|subtract|sum|product|"
                       r"difference|quotient|remainder|squared|cubed|power|root|percent|ratio|average|mean|"
                       r"integral|derivative|modulo)\b", re.I)
_REASON = re.compile(r"\b(?:prove|show that|derive|deduce|calculate|compute|determine|solve|find|estimate|"
                     r"if|given|suppose|assume|then|therefore|hence|how many|how much|at least|at most|"
                     r"maximum|minimum|step)\b", re.I)
_CAUSAL = re.compile(r"\bwhy\b|\bhow\b(?!\s+(?:many|much|old|long|far|tall|big)\b)|\bexplain\b|\bwhat causes?\b|"
                     r"\bbecause\b|\breason\b|\bwhat would happen\b|\bwhat happens\b|\bresult in\b", re.I)
_SPATIAL = re.compile(r"\b(?:left of|right of|to the left|to the right|above|below|beneath|under|over|behind|"
                      r"in front of|between|next to|beside|adjacent|near|inside|outside|on top of|opposite|"
                      r"parallel|perpendicular|intersects?|across from|surrounding|top|bottom|upper|lower)\b",
                      re.I)
_OBJECT = re.compile(r"\b(?:the|a|an|each|both|two|three|another|other)\s+(?:\w+\s+)?([a-z]{3,})\b", re.I)
_NOT_OBJECTS = frozenset(
    "left right top bottom front back middle image picture figure photo diagram following same other value "
    "number answer question one".split())
DOMAIN_TERMS = frozenset(
    "angle triangle circle radius diameter area perimeter volume polygon square rectangle parallelogram trapezoid "
    "chord tangent arc sector hypotenuse vertex vertices segment slope graph function equation axis coordinate "
    "probability matrix vector integral derivative sequence series prime digit fraction velocity acceleration "
    "force mass friction gravity momentum energy pressure density current voltage resistance circuit magnetic "
    "wavelength frequency lens refraction molecule atom electron reaction acid base catalyst compound solution "
    "cell enzyme protein gene photosynthesis organism species population temperature".split())
_IDENTIFY = re.compile(r"^\s*(?:what|where|which|who|name)\b", re.I)


def question_text(text: str) -> str:
    """The question without image markers."""
    return text.replace(IMAGE_MARKER, " ").strip()


def question_cues(text: str, p: TextCueParams = TextCueParams()) -> dict[str, float]:
    """S_t cues: `words` and `ops` (raw counts), `len`, `ops_score`, `reason` (0..1) and `cue` (weighted mean).

    Operators: arithmetic/relational symbols (a hyphen between letters is not one), LaTeX operators and operator
    words (sum, product, divided, ...)."""
    text = question_text(text)
    words = len(_WORD.findall(text))
    ops = len(_OP_SYMBOLS.findall(text)) + len(_OP_LATEX.findall(text)) + len(_OP_WORDS.findall(text))
    reason = len(_REASON.findall(text))
    s_len = min(1.0, words / p.length_ref)
    s_ops = min(1.0, ops / p.ops_ref)
    s_reason = min(1.0, reason / p.reason_ref)
    cue = (p.w_length * s_len + p.w_ops * s_ops + p.w_reason * s_reason) / (p.w_length + p.w_ops + p.w_reason)
    return {"words": float(words), "ops": float(ops), "len": s_len, "ops_score": s_ops, "reason": s_reason,
            "cue": cue}


def integration_cues(text: str, p: TextCueParams = TextCueParams()) -> dict[str, float]:
    """S_I cues: `causal` (1 for a why/how/explain question; "how many/much" is counting, not causal),
    `spatial` (spatial relations scaled by whether at least two objects are named), `domain` (distinct domain
    terms), `what_where` (1 for a what/where/which/who lead that is not causal) and `cue` =
    clip(w_causal*causal + w_spatial*spatial + w_domain*domain - w_what_where*what_where, 0, 1) / (sum of the
    positive weights)."""
    text = question_text(text)
    causal = 1.0 if _CAUSAL.search(text) else 0.0
    relations = len(_SPATIAL.findall(text))
    objects = {m.lower() for m in _OBJECT.findall(text)} - _NOT_OBJECTS
    spatial = min(1.0, relations / p.spatial_ref) * min(1.0, len(objects) / 2.0)
    terms = {w.lower() for w in _WORD.findall(text)}
    terms |= {w[:-1] for w in terms if w.endswith("s")}  # plurals
    domain = min(1.0, len(terms & DOMAIN_TERMS) / p.domain_ref)
    what_where = 1.0 if _IDENTIFY.search(text) and not causal else 0.0
    pos = p.w_causal + p.w_spatial + p.w_domain
    raw = p.w_causal * causal + p.w_spatial * spatial + p.w_domain * domain - p.w_what_where * what_where
    return {"causal": causal, "spatial": spatial, "objects": float(len(objects)), "domain": domain,
            "what_where": what_where, "cue": min(1.0, max(0.0, raw / pos))}
