"""``kvaas migrate``: apply or revert database migrations."""

from __future__ import annotations

from typing import Annotated

import typer

from kvaas.cli.root import app, fail, load_settings, out, redact


@app.command("migrate")
def migrate_cmd(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    down: Annotated[bool, typer.Option("--down", help="Downgrade to REVISION instead.")] = False,
) -> None:
    """Apply (or with --down, revert) database migrations."""
    from kvaas.db import migrate

    s = load_settings()
    url = s.resolved_database_url
    s.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        (migrate.downgrade if down else migrate.upgrade)(url, revision)
        current = migrate.current_revision(url)
    except Exception as e:
        from kvaas.db.session import is_connection_error

        if is_connection_error(e):
            raise fail(f"database unavailable ({redact(url)}): {e}", 3) from e
        raise fail(f"migration failed: {e}", 1) from e
    out.print(f"database {redact(url)} at revision [bold]{current or 'base'}[/]")
