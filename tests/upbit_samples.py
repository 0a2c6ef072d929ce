"""Where the real Upbit sample messages are: the project's shared reference material.

They live beside the repository (``../shared/upbit/samples``); ``UPBUS_SAMPLES``
names another folder. In CI (see ``required``) they must be there: tests that need
them fail rather than skip.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
from required import REQUIRED

SAMPLES = Path(
    os.environ.get(
        "UPBUS_SAMPLES",
        Path(__file__).resolve().parents[2] / "shared" / "upbit" / "samples",
    )
)

if not SAMPLES.is_dir() and REQUIRED:
    raise RuntimeError(f"Upbit samples not found at {SAMPLES} (set UPBUS_SAMPLES)")

# Outside CI a checkout without the reference material still runs the rest.
needs_samples = pytest.mark.skipif(
    not SAMPLES.is_dir(), reason=f"Upbit samples not found at {SAMPLES} (set UPBUS_SAMPLES)"
)


@functools.cache
def sample_text(name: str) -> str:
    """The sample file ``name``, read once; call it from a test or at collection, not at import."""
    return (SAMPLES / name).read_text(encoding="utf-8")
