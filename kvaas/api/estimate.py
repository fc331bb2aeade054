"""``POST /v1/cache/estimate``: what a cache of a prompt would hold and cost, before creating
it, and after how many attaches it pays off against re-sending the prompt."""

from __future__ import annotations

from fastapi import APIRouter

from kvaas.api.deps import Auth, CacheServiceDep, PriceBookDep, SettingsDep, require_scope
from kvaas.api.errors import error_responses
from kvaas.api.schemas.estimate import Comparison, Estimate, EstimateRequest, StoredSize
from kvaas.billing.money import format_amount
from kvaas.errors import AuthenticationError, BadRequest, PermissionDenied
from kvaas.services import estimates
from kvaas.services.caches import EngineUnavailable

router = APIRouter(prefix="/v1", tags=["caches"])


@router.post(
    "/cache/estimate",
    dependencies=[require_scope("caches:read")],
    summary="Estimate a cache's size, price and break-even before creating it",
    responses=error_responses(AuthenticationError, PermissionDenied, BadRequest, EngineUnavailable),
)
async def estimate_cache(
    body: EstimateRequest,
    auth: Auth,
    settings: SettingsDep,
    service: CacheServiceDep,
    pricebook: PriceBookDep,
) -> Estimate:
    est = await estimates.estimate_cache(
        service.prompts,
        settings,
        pricebook,
        estimates.EstimateSpec(
            prompt=body.to_prompt(),
            storage_class=body.storage_class,
            scheme=body.compression,
            ttl_seconds=body.ttl_seconds,
        ),
    )
    econ = est.economics
    expected = None
    if body.expected_attaches is not None:
        n = body.expected_attaches
        w, wo = econ.with_cache(n), econ.without_cache(n)
        expected = Comparison(
            attaches=n,
            with_cache=format_amount(w),
            without_cache=format_amount(wo),
            savings=format_amount(wo - w),
        )
    return Estimate(
        model=est.model,
        tokens=est.tokens,
        stored_tokens=est.stored_tokens,
        chunk_tokens=est.chunk_tokens,
        kv_bytes_per_token=est.kv_bytes_per_token,
        storage_class=est.storage_class,
        compression=est.scheme,
        ttl_seconds=est.ttl_seconds,
        stored_bytes=est.stored_bytes,
        stored_bytes_by_compression={
            scheme: StoredSize(bytes=s.bytes, ratio=s.ratio, exact=s.exact)
            for scheme, s in est.sizes.items()
        },
        currency=est.currency,
        pricebook_version=est.pricebook_version,
        storage_price_per_hour=format_amount(econ.storage_per_hour),
        storage_cost_for_ttl=format_amount(econ.storage_for_ttl),
        create_cost=format_amount(econ.create),
        attach_cost=format_amount(econ.attach),
        resend_cost=format_amount(econ.resend),
        break_even_attaches=econ.break_even_attaches,
        expected=expected,
    )
