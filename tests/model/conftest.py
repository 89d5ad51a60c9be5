"""Shared tiny models for the model tests (built in milliseconds: function scope keeps tests independent).

Imports happen inside the fixtures so that tests which need no model (tiling) skip transformers' import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch
    from transformers import InternVLForConditionalGeneration, PreTrainedTokenizerFast

    from r1v.model import TinySpec


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    from r1v.model import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture
def spec() -> TinySpec:
    from r1v.model import TinySpec

    return TinySpec()


@pytest.fixture
def vlm(spec: TinySpec, tokenizer: PreTrainedTokenizerFast) -> InternVLForConditionalGeneration:
    from r1v.model import build_tiny_vlm

    model, _ = build_tiny_vlm(spec, tokenizer)
    return model


@pytest.fixture
def pixel_values(spec: TinySpec) -> torch.Tensor:
    import torch

    return torch.randn(3, 3, spec.tile_size, spec.tile_size, generator=torch.Generator().manual_seed(0))
