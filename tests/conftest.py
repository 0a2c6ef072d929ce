"""Shared test configuration.

Async tests run on asyncio unless a test asks for trio (for example to use trio's
``MockClock`` as a virtual clock).
"""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
