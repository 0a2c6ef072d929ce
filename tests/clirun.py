"""Running the ``upbus`` command as a user would, for the command-line tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

UPBUS = [sys.executable, "-m", "upbus"]


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without ``UPBUS_*`` variables, plus ``extra``.

    The test run's own variables (``UPBUS_REQUIRE_SERVICES``, say) would otherwise
    reach the command as settings.
    """
    clean = {k: v for k, v in os.environ.items() if not k.startswith("UPBUS_")}
    return {**clean, **extra}


def run_upbus(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``upbus *args`` to completion (60 s at most), in a clean environment plus ``env``."""
    return subprocess.run(
        [*UPBUS, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_environment(**(env or {})),
        cwd=cwd,
        check=False,
    )
