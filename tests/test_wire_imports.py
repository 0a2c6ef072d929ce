"""Each transport loads with its own dependencies only."""

from __future__ import annotations

import subprocess
import sys

from required import import_or_skip

# picows is optional (the fast extra); the test extra installs it, so CI runs this.
import_or_skip("picows", "the fast extra (picows) is not installed")


def test_the_picows_transport_loads_without_httpx_and_wsproto() -> None:
    script = """
import sys
for name in ("httpx", "httpcore", "wsproto", "httpx_ws"):
    sys.modules[name] = None  # importing it now raises ImportError
import upbus.core.wire._picows
import upbus.plugins.picows_transport
assert "upbus.core.wire._httpx" not in sys.modules
assert "upbus.core.wire._upgrade" not in sys.modules
print("loaded")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded"
