"""``kvaas invoices run|sync --period YYYY-MM``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from kvaas.cli.root import app, err, fail, load_settings, out, with_session

invoices_app = typer.Typer(help="Issue invoices and push them to Stripe.", no_args_is_help=True)
app.add_typer(invoices_app, name="invoices")

PeriodOpt = Annotated[str, typer.Option("--period", help="Calendar month (UTC), e.g. 2026-11.")]


@invoices_app.command("run")
def invoices_run(period: PeriodOpt) -> None:
    """Issue every tenant's invoice for a closed month (idempotent: re-running changes nothing)."""
    from kvaas.billing.invoices import run_invoices
    from kvaas.billing.pricebook import PriceBookError, pricebook_for

    settings = load_settings()
    try:
        pricebook = pricebook_for(settings.pricebook_path)
    except PriceBookError as e:
        raise fail(str(e), 2) from e

    async def run(s: Any) -> Any:
        return await run_invoices(
            s, period, pricebook, settings.data_dir, progress=lambda m: err.print(m)
        )

    result = with_session(run)
    out.print(
        f"period {period}: {len(result.created)} issued, {len(result.existing)} unchanged, "
        f"{len(result.empty)} without billable usage"
    )


@invoices_app.command("sync")
def invoices_sync(period: PeriodOpt) -> None:
    """Push a month's invoices to Stripe (resumable: run again after a failure)."""
    from kvaas.billing.stripe_sync import StripeSyncError, make_client, sync_period

    settings = load_settings()
    client = make_client(settings)
    if client is None:
        raise fail("KVAAS_STRIPE_API_KEY is not set: invoices are kept locally only", 2)

    async def run(s: Any) -> Any:
        return await sync_period(s, period, client, progress=lambda m: err.print(m))

    try:
        result = with_session(run)
    except StripeSyncError as e:
        raise fail(f"{e}; what was sent is recorded, run the sync again to resume", 1) from e
    out.print(
        f"period {period}: {len(result.synced)} sent, {len(result.already)} already in Stripe, "
        f"{len(result.skipped)} with nothing to charge ({result.requests} requests)"
    )
