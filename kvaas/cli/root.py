"""The root ``kvaas`` Typer app and the helpers every command module shares.

Exit codes: 0 success, 1 the operation was refused (not found, conflict…), 2 bad usage or
invalid input, 3 a component (database) is unavailable.

Command modules import ``app`` (or add their group to it) and the helpers from here; this
module imports none of them, so the package has no import cycle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from kvaas import __version__
from kvaas.config import Settings, get_settings
from kvaas.redact import redact_url

T = TypeVar("T")

app = typer.Typer(
    name="kvaas",
    help="KVaaS: KVCache-as-a-Service. Run the service and manage tenants, keys and models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

out = Console()
"""Results (stdout)."""
err = Console(stderr=True)
"""Progress, notices and errors (stderr)."""


def _version(value: bool) -> None:
    if value:
        out.print(f"kvaas {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """KVaaS command line."""


def fail(message: str, code: int) -> typer.Exit:
    """Print ``message`` as an error on stderr and return the exit to raise with ``code``."""
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def load_settings() -> Settings:
    """The settings in force; invalid configuration exits 2 naming what is wrong."""
    try:
        return get_settings()
    except Exception as e:  # pydantic ValidationError: show which variable is wrong
        raise fail(f"invalid configuration: {e}", 2) from e


def with_session(fn: Callable[[Any], Awaitable[T]], *, migrate_first: bool = True) -> T:
    """Run ``fn(session)`` against the configured database, mapping errors to exit codes.

    Migrates first when ``migrate_first`` and the ``auto_migrate`` setting are on. Invalid
    input exits 2, a refused operation (any other ``APIError``) 1, an unreachable database 3.
    """
    from kvaas.db import migrate
    from kvaas.db.session import Database, DatabaseUnavailable
    from kvaas.errors import APIError, ValidationFailed

    settings = load_settings()
    url = settings.resolved_database_url
    settings.data_dir.mkdir(parents=True, exist_ok=True)

    async def run() -> T:
        db = Database(url, timeout=settings.database_timeout_seconds)
        try:
            async with db.session() as s:
                return await fn(s)
        finally:
            await db.dispose()

    try:
        if migrate_first and settings.auto_migrate:
            migrate.upgrade(url)
        return asyncio.run(run())
    except ValidationFailed as e:
        raise fail(e.message, 2) from e
    except APIError as e:
        raise fail(e.message, 1) from e
    except DatabaseUnavailable as e:
        raise fail(f"database unavailable ({redact(url)}): {e}", 3) from e
    except Exception as e:
        from kvaas.db.session import is_connection_error

        if is_connection_error(e):
            raise fail(f"database unavailable ({redact(url)}): {e}", 3) from e
        raise


def redact(url: str) -> str:
    """``url`` with its password masked, fit to print."""
    return redact_url(url)
