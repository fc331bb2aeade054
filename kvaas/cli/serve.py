"""``kvaas serve``: run the HTTP service."""

from __future__ import annotations

from typing import Annotated

import typer

from kvaas import __version__
from kvaas.cli.root import app, load_settings, out, redact


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [KVAAS_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [KVAAS_PORT].")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes [KVAAS_WORKERS].")] = None,
) -> None:
    """Run the HTTP service (uvicorn)."""
    import uvicorn

    s = load_settings()
    host, port, workers = host or s.host, port or s.port, workers or s.workers
    base = f"http://{host}:{port}"
    out.print(
        f"[bold]KVaaS {__version__}[/] on {base}  (database: "
        f"{redact(s.resolved_database_url)}, data: {s.data_dir.resolve()})"
    )
    out.print(
        "Next, in another shell:\n"
        "  KEY=$(.venv/bin/kvaas tenants create acme)\n"
        f'  curl -s -H "Authorization: Bearer $KEY" {base}/v1/me\n'
        f"  curl -s {base}/readyz",
        soft_wrap=True,
        highlight=False,
    )
    uvicorn.run(
        "kvaas.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=s.log_level,
        proxy_headers=True,
    )
