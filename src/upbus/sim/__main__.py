"""``python -m upbus.sim``: the same as ``upbus sim``."""

from upbus.sim.cli import run_cli

raise SystemExit(run_cli())
