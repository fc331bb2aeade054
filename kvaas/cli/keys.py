"""``kvaas keys create|list|revoke``."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from kvaas.cli.root import app, err, out, with_session

keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


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

    key, secret = with_session(
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
    for k in with_session(run):
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

    k = with_session(lambda s: revoke_key(s, Actor("cli"), key))
    out.print(f"key {k.id} (prefix {k.prefix}) revoked at {k.revoked_at}")
