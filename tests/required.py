"""Whether a test may skip for want of something outside the project.

Where CI runs (``CI`` set, or ``UPBUS_REQUIRE_SERVICES=1`` as ``.ci/run`` sets it)
nothing may be skipped for a missing tool, service or reference file: its absence is
a failure. Elsewhere such a test may skip, with a reason naming what is missing.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import pytest

REQUIRED = bool(os.environ.get("CI")) or os.environ.get("UPBUS_REQUIRE_SERVICES") == "1"


def skip_unless_required(reason: str) -> None:
    """Skip with ``reason``, or fail with it where everything is required."""
    if REQUIRED:
        pytest.fail(f"{reason} (required here: CI or UPBUS_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


def import_or_skip(module: str, reason: str) -> Any:
    """Import ``module``, or skip with ``reason`` — a failure where everything is required.

    For the optional extras the test extra installs (psycopg, picows): CI must run
    their tests, never skip them for a broken install.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        skip_unless_required(reason)
        raise  # not reached: skip_unless_required raises
