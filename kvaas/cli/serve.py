"""``kvaas serve``: run the HTTP service (and the admin listener, when one is configured)."""

from __future__ import annotations

import multiprocessing
from typing import Annotated

import typer

from kvaas import __version__
from kvaas.cli.root import app, load_settings, out, redact


def _serve_admin(host: str, port: int, log_level: str) -> None:
    """The admin listener's process: ``/admin/api`` alone (settings from the environment, as
    the public listener's)."""
    import uvicorn

    from kvaas.api.http_protocol import http_protocol

    uvicorn.run(
        "kvaas.app:create_admin_app",
        factory=True,
        host=host,
        port=port,
        workers=1,
        log_level=log_level,
        proxy_headers=True,
        http=http_protocol(),
    )


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [KVAAS_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [KVAAS_PORT].")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes [KVAAS_WORKERS].")] = None,
) -> None:
    """Run the HTTP service (uvicorn).

    With KVAAS_ADMIN_PORT set, the admin API runs on its own listener beside it (a second
    process, stopped with this one) and not on the public port.
    """
    import uvicorn

    from kvaas.api.http_protocol import http_protocol

    s = load_settings()
    host, port, workers = host or s.host, port or s.port, workers or s.workers
    if workers > 1 and s.engine == "inprocess":
        out.print(
            f"[red]error:[/] {workers} workers would each start their own in-process engine on "
            "the same device (memory for one, each loading the model). Run one worker, or run "
            "the engine as nodes (KVAAS_ENGINE=remote, `kvaas engine command`) behind several "
            "workers."
        )
        raise typer.Exit(2)
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
    admin = None
    if s.admin_bind is not None:
        admin_host, admin_port = s.admin_bind
        admin = multiprocessing.get_context("spawn").Process(
            target=_serve_admin,
            args=(admin_host, admin_port, s.log_level),
            name="kvaas-admin",
            daemon=True,
        )
        admin.start()
        out.print(
            f"Admin API on http://{admin_host}:{admin_port}/admin/api (not on {base})",
            highlight=False,
        )
    try:
        uvicorn.run(
            "kvaas.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=s.log_level,
            proxy_headers=True,
            http=http_protocol(),  # Nagle off on every connection, whichever socket
        )
    finally:
        if admin is not None:
            admin.terminate()  # SIGTERM: uvicorn shuts down gracefully
            admin.join(timeout=15)
