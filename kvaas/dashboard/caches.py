"""Caches of every tenant: a filtered, paged list; a cache's versions, chunks per tier, hits
and lifetime; extend its lifetime, change its class, delete it (after a confirmation).

Actions call the cache service the API calls (:class:`kvaas.services.caches.CacheService`),
with the audit entry added to the session first so it commits in the action's transaction.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import Response

from kvaas.api.deps import SessionDep
from kvaas.auth.tenancy import find_tenant, namespace_secret
from kvaas.dashboard.auth import form_of
from kvaas.dashboard.deps import (
    Operator,
    actor,
    failed,
    notice_of,
    optional_int,
    redirect,
    service_of,
)
from kvaas.dashboard.render import page
from kvaas.db.models import CACHE_STATUSES, Cache, Tenant
from kvaas.db.repositories import AuditRepository
from kvaas.errors import APIError, NotFound, ServiceUnavailable, ValidationFailed
from kvaas.services import admin_lists
from kvaas.services.caches import CachePatch, CacheService
from kvaas.store.errors import StoreError
from kvaas.store.keys import derive_namespace, namespace_slot
from kvaas.store.policy import DEFAULT_PLACEMENT, resolve_placement

router = APIRouter(prefix="/admin/caches", include_in_schema=False)


def cache_path(cache_id: str) -> str:
    """The cache's page (the id quoted: it came from the request's path)."""
    return f"/admin/caches/{quote(cache_id, safe='')}"


CLASSES = ("hot", "standard", "cold")


def classes_in_tier(service: CacheService | None, tier: str) -> list[str]:
    """The storage classes whose writes go to ``tier`` in this gateway's store."""
    if service is None:
        return []
    names = [t.name for t in service.store.tiers]
    placed = resolve_placement(DEFAULT_PLACEMENT, names)
    return [cls for cls, tiers in placed.items() if tier in tiers]


@router.get("")
async def dashboard_caches(request: Request, session: SessionDep, operator: Operator) -> Response:
    p = request.query_params
    service = service_of(request)
    tier = p.get("tier") or None
    f = admin_lists.CacheQuery(
        tenant_id=None,
        model=p.get("model") or None,
        status=p.get("status") or "ready",
        storage_class=p.get("class") or None,
        classes_in_tier=classes_in_tier(service, tier) if tier else None,
        after=p.get("after") or None,
    )
    tenant_ref = (p.get("tenant") or "").strip()
    try:
        if tenant_ref:
            f.tenant_id = (await find_tenant(session, tenant_ref)).id
        result = await admin_lists.caches_page(session, f)
    except APIError as e:
        return await failed(request, session, operator, "Caches", e, "/admin/caches")
    return page(
        request,
        "caches.html",
        operator,
        section="caches",
        rows=result.rows,
        cursor=result.next_cursor,
        f=f,
        tenant=tenant_ref,
        tier=tier or "",
        tiers=[t.name for t in service.store.tiers] if service else [],
        models=await admin_lists.models_in_use(session),
        statuses=CACHE_STATUSES,
        classes=CLASSES,
        query={k: v for k, v in p.items() if k not in ("after", "done")},
        notice=notice_of(request),
    )


@dataclass
class TierChunks:
    tier: str
    present: int | None  # None: the tier did not answer


async def chunks_per_tier(service: CacheService, tenant: Tenant, cache: Cache) -> list[TierChunks]:
    """How many of the latest version's chunks each tier of this gateway holds."""
    slot = namespace_slot(derive_namespace(namespace_secret(tenant, service.master_keys)))
    try:
        manifest = await asyncio.wait_for(
            service.store.get_manifest(slot, cache.id, cache.version), 3.0
        )
    except (TimeoutError, StoreError):
        return [TierChunks(t.name, None) for t in service.store.tiers]
    if manifest is None:
        return [TierChunks(t.name, 0) for t in service.store.tiers]
    out = []
    for t in service.store.tiers:
        try:
            found = await asyncio.wait_for(t.exists_many(list(manifest.chunk_keys)), 3.0)
            out.append(TierChunks(t.name, sum(found)))
        except (TimeoutError, StoreError):
            out.append(TierChunks(t.name, None))
    return out


async def _cache_and_tenant(session: SessionDep, cache_id: str) -> tuple[Cache, Tenant]:
    cache = await session.get(Cache, cache_id)
    tenant = await session.get(Tenant, cache.tenant_id) if cache is not None else None
    if cache is None or tenant is None:
        raise NotFound(f"no cache {cache_id!r}", param="cache_id")
    return cache, tenant


def _service(request: Request) -> CacheService:
    service = service_of(request)
    if service is None:
        raise ServiceUnavailable("cache actions need the gateway with its store: use its port")
    return service


@router.get("/{cache_id}")
async def dashboard_cache(
    cache_id: str, request: Request, session: SessionDep, operator: Operator
) -> Response:
    try:
        cache, tenant = await _cache_and_tenant(session, cache_id)
    except APIError as e:
        return await failed(request, session, operator, "Cache", e, "/admin/caches")
    service = service_of(request)
    versions: list = []
    tiers: list[TierChunks] = []
    tags: list[str] = []
    live = cache.status in ("pending", "ready", "failed")
    if service is not None and live:
        try:
            cache, versions = await service.versions(session, tenant, cache_id)  # type: ignore[assignment]
            tags = (await service.tags_of(session, [cache])).get(cache.id, [])
            if cache.status == "ready":
                tiers = await chunks_per_tier(service, tenant, cache)
        except NotFound:  # expired as we looked
            live = False
    s = request.app.state.settings
    return page(
        request,
        "cache.html",
        operator,
        section="caches",
        cache=cache,
        tenant=tenant,
        versions=versions,
        tiers=tiers,
        tags=tags,
        live=live and cache.status in ("pending", "ready", "failed"),
        classes=CLASSES,
        min_ttl=s.min_ttl_seconds,
        max_ttl=s.max_ttl_seconds,
        notice=notice_of(request),
    )


async def _act(
    request: Request,
    session: SessionDep,
    operator: Operator,
    cache_id: str,
    what: str,
    action: str,
    patch: CachePatch | None,
    details: dict[str, object],
    done: str,
) -> Response:
    """Audit ``action`` and apply ``patch`` (or delete when ``None``) in one transaction."""
    back = cache_path(cache_id)
    try:
        service = _service(request)
        _, tenant = await _cache_and_tenant(session, cache_id)
        cache = await service.get_live(session, tenant, cache_id)  # 404 once gone or expired
        who = actor(request)
        await AuditRepository(session).record(
            actor=who.name,
            action=action,
            target_type="cache",
            target_id=cache.id,
            tenant_id=tenant.id,
            request_id=who.request_id,
            details=details,
        )
        if patch is None:
            await service.delete(session, tenant, cache_id)
        else:
            await service.update(session, tenant, cache_id, patch)
    except APIError as e:
        return await failed(request, session, operator, what, e, back)
    if patch is None:
        return redirect("/admin/caches", tenant=tenant.name, done=done)
    return redirect(back, done=done)


@router.post("/{cache_id}/ttl")
async def dashboard_cache_ttl(
    cache_id: str, request: Request, session: SessionDep, operator: Operator
) -> Response:
    form = await form_of(request)
    try:
        ttl = optional_int(form, "ttl_seconds")
        if ttl is None:
            raise ValidationFailed("give the new lifetime in seconds", param="ttl_seconds")
    except APIError as e:
        return await failed(request, session, operator, "Change TTL", e, cache_path(cache_id))
    return await _act(
        request,
        session,
        operator,
        cache_id,
        "Change TTL",
        "cache.ttl",
        CachePatch(ttl_seconds=ttl),
        {"ttl_seconds": ttl},
        "ttl-changed",
    )


@router.post("/{cache_id}/class")
async def dashboard_cache_class(
    cache_id: str, request: Request, session: SessionDep, operator: Operator
) -> Response:
    cls = (await form_of(request)).get("storage_class", "")
    if cls not in CLASSES:
        e = ValidationFailed(f"storage class must be one of {CLASSES}", param="storage_class")
        return await failed(
            request,
            session,
            operator,
            "Change class",
            e,
            cache_path(cache_id),
        )
    return await _act(
        request,
        session,
        operator,
        cache_id,
        "Change class",
        "cache.storage_class",
        CachePatch(storage_class=cls),
        {"storage_class": cls},
        "class-changed",
    )


@router.get("/{cache_id}/delete")
async def dashboard_cache_confirm_delete(
    cache_id: str, request: Request, session: SessionDep, operator: Operator
) -> Response:
    try:
        cache, tenant = await _cache_and_tenant(session, cache_id)
    except APIError as e:
        return await failed(request, session, operator, "Delete cache", e, "/admin/caches")
    return page(
        request,
        "confirm.html",
        operator,
        section="caches",
        title=f"Delete cache {cache.name or cache.id} of {tenant.name}?",
        body=(
            f"{cache.tokens:,} tokens in {cache.stored_chunks} chunks are released; attaches "
            "to it get 404. This cannot be undone."
        ),
        action=f"/admin/caches/{cache.id}/delete",
        button="Delete cache",
        back=f"/admin/caches/{cache.id}",
    )


@router.post("/{cache_id}/delete")
async def dashboard_cache_delete(
    cache_id: str, request: Request, session: SessionDep, operator: Operator
) -> Response:
    return await _act(
        request,
        session,
        operator,
        cache_id,
        "Delete cache",
        "cache.delete",
        None,
        {},
        "cache-deleted",
    )
