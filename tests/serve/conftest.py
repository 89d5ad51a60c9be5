"""Fixtures of the serving tests; helpers are in serve_helpers.py."""

from __future__ import annotations

import pytest
from serve_helpers import png


@pytest.fixture(scope="session")
def tiny_png() -> bytes:
    return png()
