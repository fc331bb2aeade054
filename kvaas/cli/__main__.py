"""``python -m kvaas.cli``: the same as the ``kvaas`` command."""

from kvaas.cli import main

main()
