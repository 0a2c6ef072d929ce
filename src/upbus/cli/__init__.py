"""The ``upbus`` command: one module per command, registered on the group in ``_app``."""

from upbus.cli import _demo, _gateway, _info, _replay, _run, _watch  # noqa: F401  (they register commands)
from upbus.cli._app import main

__all__ = ("main",)
