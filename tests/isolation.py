"""A fixture that keeps the runner's UPBUS_* variables and project files out of a test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No real UPBUS_* variable or project file may leak into a test."""
    for name in list(os.environ):
        if name.upper().startswith("UPBUS_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
