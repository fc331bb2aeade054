"""``kvaas openapi``: write or check the OpenAPI document generated from the app."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kvaas.cli.root import app, fail, out
from kvaas.config import Settings


def openapi_text() -> str:
    """The app's OpenAPI document as committed: sorted keys, two-space indent, final newline.

    Built from default settings (no ``.env`` file), so it does not depend on the environment.
    """
    from kvaas.app import create_app

    spec = create_app(Settings(_env_file=None)).openapi()
    return json.dumps(spec, indent=2, sort_keys=True) + "\n"


@app.command()
def openapi(
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the document.")] = Path(
        "api_spec/openapi.json"
    ),
    check: Annotated[
        bool, typer.Option("--check", help="Fail (exit 1) if the file differs from the app.")
    ] = False,
) -> None:
    """Write the OpenAPI document generated from the app (or check it is current)."""
    text = openapi_text()
    if check:
        current = out_path.read_text() if out_path.exists() else ""
        if current != text:
            raise fail(f"{out_path} is stale: run `kvaas openapi` and commit the result", 1)
        out.print(f"{out_path} is up to date")
        return
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    out.print(f"wrote {out_path}")
