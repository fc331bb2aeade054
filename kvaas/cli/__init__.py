"""The ``kvaas`` command line (entry point ``kvaas.cli:main``).

``kvaas.cli.root`` holds the root Typer ``app`` and the helpers the commands share; every other
module holds one command or command group and registers it on ``app`` when imported. Command
modules import from ``kvaas.cli.root`` only and it imports none of them, so there is no import
cycle; library packages never import ``kvaas.cli``.
"""

from __future__ import annotations

import sys

# Importing a command module registers it: this order is the order `kvaas --help` lists.
# isort: off
from kvaas.cli.root import app
from kvaas.cli import serve, db, openapi  # noqa: F401
from kvaas.cli import tenants, keys, config, engine, models, codec, invoices  # noqa: F401

# isort: on

__all__ = ["app", "main"]


def main() -> None:
    """Run the command line; Ctrl-C exits 130."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
