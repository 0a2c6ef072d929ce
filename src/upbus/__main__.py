"""``python -m upbus``: the same as the ``upbus`` command."""

from upbus.cli import main

main()
