"""``kvaas config show|markdown``: inspect configuration."""

from __future__ import annotations

import typer
from rich.table import Table

from kvaas.cli.root import app, load_settings, out
from kvaas.config import Settings, settings_markdown_table
from kvaas.redact import redact_url

config_app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show() -> None:
    """Print the settings in force (secrets masked)."""
    s = load_settings()
    table = Table("setting", "value")
    for name in Settings.model_fields:
        value = getattr(s, name)
        shown = redact_url(value) if isinstance(value, str) else str(value)
        table.add_row(f"KVAAS_{name.upper()}", shown)
    out.print(table)


@config_app.command("markdown")
def config_markdown() -> None:
    """Print the configuration table of docs/configuration.md."""
    print(settings_markdown_table())
