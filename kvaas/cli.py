"""The ``kvaas`` command line.

Exit codes: 0 success, 1 the operation was refused (not found, conflict…), 2 bad usage or
invalid input, 3 a component (database) is unavailable.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from kvaas import __version__
from kvaas.billing.cli import invoices_app
from kvaas.codec.cli import codec_app
from kvaas.config import Settings, get_settings, settings_markdown_table
from kvaas.model_presets.cli import models_app

T = TypeVar("T")

app = typer.Typer(
    name="kvaas",
    help="KVaaS: KVCache-as-a-Service. Run the service and manage tenants, keys and models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
tenants_app = typer.Typer(help="Manage tenants.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)
engine_app = typer.Typer(help="Engine helpers.", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(config_app, name="config")
app.add_typer(engine_app, name="engine")
app.add_typer(models_app, name="models")
app.add_typer(codec_app, name="codec")
app.add_typer(invoices_app, name="invoices")

out = Console()
err = Console(stderr=True)


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


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def _settings() -> Settings:
    try:
        return get_settings()
    except Exception as e:  # pydantic ValidationError: show which variable is wrong
        raise _fail(f"invalid configuration: {e}", 2) from e


def _with_session(fn: Callable[[Any], Awaitable[T]], *, migrate_first: bool = True) -> T:
    """Run ``fn(session)`` against the configured database, mapping errors to exit codes."""
    from kvaas.db import migrate
    from kvaas.db.session import Database, DatabaseUnavailable
    from kvaas.errors import APIError, ValidationFailed

    settings = _settings()
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
        raise _fail(e.message, 2) from e
    except APIError as e:
        raise _fail(e.message, 1) from e
    except DatabaseUnavailable as e:
        raise _fail(f"database unavailable ({_redact(url)}): {e}", 3) from e
    except Exception as e:
        from kvaas.db.session import is_connection_error

        if is_connection_error(e):
            raise _fail(f"database unavailable ({_redact(url)}): {e}", 3) from e
        raise


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# --- serve / migrate / openapi ----------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [KVAAS_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [KVAAS_PORT].")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes [KVAAS_WORKERS].")] = None,
) -> None:
    """Run the HTTP service (uvicorn)."""
    import uvicorn

    s = _settings()
    host, port, workers = host or s.host, port or s.port, workers or s.workers
    base = f"http://{host}:{port}"
    out.print(
        f"[bold]KVaaS {__version__}[/] on {base}  (database: "
        f"{_redact(s.resolved_database_url)}, data: {s.data_dir.resolve()})"
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


@app.command("migrate")
def migrate_cmd(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    down: Annotated[bool, typer.Option("--down", help="Downgrade to REVISION instead.")] = False,
) -> None:
    """Apply (or with --down, revert) database migrations."""
    from kvaas.db import migrate

    s = _settings()
    url = s.resolved_database_url
    s.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        (migrate.downgrade if down else migrate.upgrade)(url, revision)
        current = migrate.current_revision(url)
    except Exception as e:
        from kvaas.db.session import is_connection_error

        if is_connection_error(e):
            raise _fail(f"database unavailable ({_redact(url)}): {e}", 3) from e
        raise _fail(f"migration failed: {e}", 1) from e
    out.print(f"database {_redact(url)} at revision [bold]{current or 'base'}[/]")


def _openapi_text() -> str:
    from kvaas.app import create_app

    spec = create_app(Settings(_env_file=None)).openapi()  # type: ignore[call-arg]
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
    text = _openapi_text()
    if check:
        current = out_path.read_text() if out_path.exists() else ""
        if current != text:
            raise _fail(f"{out_path} is stale: run `kvaas openapi` and commit the result", 1)
        out.print(f"{out_path} is up to date")
        return
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    out.print(f"wrote {out_path}")


# --- tenants -------------------------------------------------------------------------------


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="Tenant name: a-z, 0-9, '-', '_'.")],
    quota_tokens: Annotated[
        int | None, typer.Option(min=0, help="Storage quota in tokens.")
    ] = None,
    quota_bytes: Annotated[int | None, typer.Option(min=0, help="Storage quota in bytes.")] = None,
    max_caches: Annotated[
        int | None, typer.Option(min=0, help="Most live caches (default: the setting).")
    ] = None,
) -> None:
    """Create a tenant and print its first API key (shown once)."""
    from kvaas.auth.tenancy import Actor, create_tenant

    tenant, secret = _with_session(
        lambda s: create_tenant(
            s,
            Actor("cli"),
            name,
            storage_quota_tokens=quota_tokens,
            storage_quota_bytes=quota_bytes,
            max_caches=max_caches,
        )
    )
    err.print(f"created tenant [bold]{tenant.name}[/] ({tenant.id}); its API key, shown once:")
    print(secret)


@tenants_app.command("list")
def tenants_list() -> None:
    """List tenants."""
    from kvaas.db.repositories import TenantRepository

    tenants = _with_session(lambda s: TenantRepository(s).list())
    table = Table("id", "name", "status", "quota tokens", "quota bytes", "created")
    for t in tenants:
        table.add_row(
            t.id,
            t.name,
            t.status,
            str(t.storage_quota_tokens or "-"),
            str(t.storage_quota_bytes or "-"),
            t.created_at.isoformat(timespec="seconds"),
        )
    out.print(table)


@tenants_app.command("disable")
def tenants_disable(tenant: Annotated[str, typer.Argument(help="Tenant id or name.")]) -> None:
    """Disable a tenant: its keys get 403 until it is enabled again."""
    from kvaas.auth.tenancy import Actor, set_tenant_status

    t = _with_session(lambda s: set_tenant_status(s, Actor("cli"), tenant, "disabled"))
    out.print(f"tenant {t.name} is disabled")


@tenants_app.command("enable")
def tenants_enable(tenant: Annotated[str, typer.Argument(help="Tenant id or name.")]) -> None:
    """Enable a disabled tenant."""
    from kvaas.auth.tenancy import Actor, set_tenant_status

    t = _with_session(lambda s: set_tenant_status(s, Actor("cli"), tenant, "active"))
    out.print(f"tenant {t.name} is active")


# --- keys ----------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Argument(help="Tenant id or name.")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "default",
    scope: Annotated[
        list[str] | None, typer.Option(help="Scope (repeatable); default '*'.")
    ] = None,
) -> None:
    """Create an API key for a tenant and print it (shown once)."""
    from kvaas.auth.tenancy import Actor, create_key

    key, secret = _with_session(
        lambda s: create_key(s, Actor("cli"), tenant, name=name, scopes=scope or ["*"])
    )
    err.print(f"created key {key.id} (prefix {key.prefix}); shown once:")
    print(secret)


@keys_app.command("list")
def keys_list(tenant: Annotated[str, typer.Argument(help="Tenant id or name.")]) -> None:
    """List a tenant's keys (prefixes only; secrets are never stored)."""
    from kvaas.auth.keys import display_prefix
    from kvaas.auth.tenancy import find_tenant
    from kvaas.db.repositories import ApiKeyRepository

    async def run(s: Any) -> list[Any]:
        t = await find_tenant(s, tenant)
        return list(await ApiKeyRepository(s).list(t.id))

    table = Table("id", "key", "name", "scopes", "created", "last used", "revoked")
    for k in _with_session(run):
        table.add_row(
            k.id,
            display_prefix(k.prefix),
            k.name,
            ",".join(k.scopes),
            k.created_at.isoformat(timespec="seconds"),
            k.last_used_at.isoformat(timespec="seconds") if k.last_used_at else "-",
            k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else "-",
        )
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="Key id (key_…) or prefix.")]) -> None:
    """Revoke an API key (idempotent)."""
    from kvaas.auth.tenancy import Actor, revoke_key

    k = _with_session(lambda s: revoke_key(s, Actor("cli"), key))
    out.print(f"key {k.id} (prefix {k.prefix}) revoked at {k.revoked_at}")


# --- config --------------------------------------------------------------------------------


@config_app.command("show")
def config_show() -> None:
    """Print the settings in force (secrets masked)."""
    s = _settings()
    table = Table("setting", "value")
    for name in Settings.model_fields:
        table.add_row(f"KVAAS_{name.upper()}", str(getattr(s, name)))
    out.print(table)


@config_app.command("markdown")
def config_markdown() -> None:
    """Print the README's configuration table."""
    print(settings_markdown_table())


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()


@engine_app.command("command")
def engine_command(
    port: Annotated[int, typer.Option(help="Port the node listens on.")] = 8100,
) -> None:
    """Print the `vllm serve` command of a remote engine node for the current settings."""
    import shlex

    from kvaas.engine import kv_dtype
    from kvaas.engine.remote import serve_command
    from kvaas.model_presets import resolve_model
    from kvaas.store.factory import StoreConfig

    s = _settings()
    model_dir = resolve_model(s.model, s.data_dir / "models")
    cmd = serve_command(
        str(model_dir.resolve()),
        s.model if "/" not in s.model else model_dir.name,
        StoreConfig.from_settings(s).to_dict(),
        port=port,
        dtype=kv_dtype(model_dir, s.engine_dtype),
        max_model_len=s.engine_max_model_len,
        max_num_batched_tokens=s.engine_max_batched_tokens,
        prefix_caching=s.engine_prefix_caching,
    )
    typer.echo(shlex.join(cmd))
