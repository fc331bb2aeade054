"""Cache lifecycle: list, get, patch and delete caches; extend them by versions."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.api.deps import Auth, CacheServiceDep, SessionDep, engine_work, require_scope
from kvaas.api.errors import error_responses
from kvaas.api.schemas.caches import CacheObject, CacheUsage
from kvaas.api.schemas.lifecycle import (
    CacheList,
    CachePatchRequest,
    CacheVersionList,
    CacheVersionObject,
    ExtendRequest,
)
from kvaas.db.models import Cache, Tenant
from kvaas.errors import (
    AuthenticationError,
    BadRequest,
    Conflict,
    NotFound,
    PermissionDenied,
    ValidationFailed,
)
from kvaas.services.caches import CacheService, EngineUnavailable, Progress
from kvaas.services.fairness import EngineBusy
from kvaas.services.listing import MAX_LIMIT, CacheFilter
from kvaas.services.quotas import QuotaExceeded

router = APIRouter(prefix="/v1", tags=["caches"])

CacheId = Annotated[str, Path(description="The cache's id (`cache_…`).", max_length=64)]
_METADATA_PARAM = re.compile(r"^metadata\[(.{1,128})\]$")


async def cache_objects(
    service: CacheService, session: AsyncSession, tenant: Tenant, caches: Sequence[Cache]
) -> list[CacheObject]:
    """API objects of ``caches`` with their tags and progress (two batched lookups)."""
    tags = await service.tags_of(session, caches)
    progress = await service.progress(tenant, caches)
    return [CacheObject.of(c, tags=tags[c.id], progress=progress.get(c.id)) for c in caches]


def _metadata_filter(request: Request, key: str | None, value: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in request.query_params.multi_items():
        m = _METADATA_PARAM.match(k)
        if m:
            out[m.group(1)] = v
    if (key is None) != (value is None):
        raise ValidationFailed(
            "give `metadata_key` and `metadata_value` together", param="metadata_key"
        )
    if key is not None and value is not None:
        out[key] = value
    return out


_READ_ERRORS = (AuthenticationError, PermissionDenied, NotFound)


@router.get(
    "/caches",
    dependencies=[require_scope("caches:read")],
    summary="List caches (newest first, cursor pagination)",
    responses=error_responses(AuthenticationError, PermissionDenied),
)
async def list_caches(
    request: Request,
    auth: Auth,
    session: SessionDep,
    service: CacheServiceDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Page size.")] = 20,
    after: Annotated[
        str | None, Query(max_length=512, description="`next_cursor` of the previous page.")
    ] = None,
    order: Annotated[Literal["asc", "desc"], Query(description="By `created_at`.")] = "desc",
    name: Annotated[str | None, Query(max_length=128)] = None,
    tag: Annotated[str | None, Query(max_length=64)] = None,
    status: Annotated[Literal["pending", "ready", "failed"] | None, Query()] = None,
    model: Annotated[str | None, Query(max_length=128)] = None,
    metadata_key: Annotated[
        str | None,
        Query(
            max_length=128,
            description="With `metadata_value`: only caches whose metadata has this pair. "
            "`metadata[<key>]=<value>` works too (repeatable; all must match).",
        ),
    ] = None,
    metadata_value: Annotated[str | None, Query(max_length=512)] = None,
) -> CacheList:
    f = CacheFilter(
        limit=limit,
        after=after,
        order=order,
        name=name,
        tag=tag,
        status=status,
        model=model,
        metadata=_metadata_filter(request, metadata_key, metadata_value),
    )
    page = await service.list_caches(session, auth.tenant, f)
    data = await cache_objects(service, session, auth.tenant, page.rows)
    return CacheList(data=data, has_more=page.has_more, next_cursor=page.next_cursor)


@router.get(
    "/caches/{cache_id}",
    dependencies=[require_scope("caches:read")],
    summary="Get a cache",
    responses=error_responses(*_READ_ERRORS),
)
async def get_cache(
    cache_id: CacheId, auth: Auth, session: SessionDep, service: CacheServiceDep
) -> CacheObject:
    cache = await service.get_live(session, auth.tenant, cache_id)
    return (await cache_objects(service, session, auth.tenant, [cache]))[0]


@router.patch(
    "/caches/{cache_id}",
    dependencies=[require_scope("caches:write")],
    summary="Update a cache: name, metadata, lifetime, storage class, refresh on hit",
    responses=error_responses(BadRequest, *_READ_ERRORS, Conflict),
)
async def update_cache(
    cache_id: CacheId,
    body: CachePatchRequest,
    auth: Auth,
    session: SessionDep,
    service: CacheServiceDep,
) -> CacheObject:
    cache = await service.update(session, auth.tenant, cache_id, body.to_patch())
    return (await cache_objects(service, session, auth.tenant, [cache]))[0]


@router.delete(
    "/caches/{cache_id}",
    dependencies=[require_scope("caches:write")],
    summary="Delete a cache and every version of it",
    responses=error_responses(*_READ_ERRORS),
)
async def delete_cache(
    cache_id: CacheId, auth: Auth, session: SessionDep, service: CacheServiceDep
) -> CacheObject:
    cache = await service.delete(session, auth.tenant, cache_id)
    return CacheObject.of(cache)


@router.post(
    "/caches/{cache_id}/extend",
    dependencies=[require_scope("caches:write"), engine_work()],
    summary="Create the next version: the latest version's tokens followed by new ones",
    status_code=201,
    responses=error_responses(
        BadRequest, *_READ_ERRORS, QuotaExceeded, Conflict, EngineBusy, EngineUnavailable
    ),
)
async def extend_cache(
    cache_id: CacheId,
    body: ExtendRequest,
    auth: Auth,
    session: SessionDep,
    service: CacheServiceDep,
) -> CacheObject:
    result = await service.extend(session, auth.tenant, cache_id, body.to_prompt())
    c = result.cache
    tags = await service.tags_of(session, [c])
    return CacheObject.of(
        c,
        CacheUsage(
            prefill_tokens=result.prefill_tokens or 0,
            ttft_ms=round(result.ttft_ms, 3) if result.ttft_ms is not None else None,
        ),
        tags=tags[c.id],
        progress=Progress(c.tokens, c.tokens),
    )


@router.get(
    "/caches/{cache_id}/versions",
    dependencies=[require_scope("caches:read")],
    summary="List a cache's versions",
    responses=error_responses(*_READ_ERRORS),
)
async def list_cache_versions(
    cache_id: CacheId, auth: Auth, session: SessionDep, service: CacheServiceDep
) -> CacheVersionList:
    cache, versions = await service.versions(session, auth.tenant, cache_id)
    return CacheVersionList(
        cache_id=cache.id,
        latest=cache.version,
        data=[CacheVersionObject.of(v, cache.chunk_tokens) for v in versions],
    )


@router.delete(
    "/caches/{cache_id}/versions/{version}",
    dependencies=[require_scope("caches:write")],
    summary="Delete one version of a cache (not its only one)",
    responses=error_responses(*_READ_ERRORS, Conflict),
)
async def delete_cache_version(
    cache_id: CacheId,
    version: Annotated[int, Path(ge=1, le=2**31 - 1)],
    auth: Auth,
    session: SessionDep,
    service: CacheServiceDep,
) -> CacheVersionObject:
    cache, row = await service.delete_version(session, auth.tenant, cache_id, version)
    return CacheVersionObject.of(row, cache.chunk_tokens)
