"""``kvaas tenants create|list|disable|enable``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from kvaas.cli.root import app, err, load_settings, out, with_session

tenants_app = typer.Typer(help="Manage tenants.", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")


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
    from kvaas.store.crypto import MasterKeys

    master_keys = MasterKeys.from_settings(load_settings())
    tenant, secret = with_session(
        lambda s: create_tenant(
            s,
            Actor("cli"),
            name,
            storage_quota_tokens=quota_tokens,
            storage_quota_bytes=quota_bytes,
            max_caches=max_caches,
            master_keys=master_keys,
        )
    )
    err.print(f"created tenant [bold]{tenant.name}[/] ({tenant.id}); its API key, shown once:")
    print(secret)


@tenants_app.command("list")
def tenants_list() -> None:
    """List tenants."""
    from kvaas.db.repositories import TenantRepository

    tenants = with_session(lambda s: TenantRepository(s).list())
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

    t = with_session(lambda s: set_tenant_status(s, Actor("cli"), tenant, "disabled"))
    out.print(f"tenant {t.name} is disabled")


@tenants_app.command("enable")
def tenants_enable(tenant: Annotated[str, typer.Argument(help="Tenant id or name.")]) -> None:
    """Enable a disabled tenant."""
    from kvaas.auth.tenancy import Actor, set_tenant_status

    t = with_session(lambda s: set_tenant_status(s, Actor("cli"), tenant, "active"))
    out.print(f"tenant {t.name} is active")
