"""Tags: a tenant's names for its caches (``PUT /v1/tags/{tag}`` re-points one atomically)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from kvaas.api.deps import Auth, CacheServiceDep, SessionDep, require_scope
from kvaas.api.errors import error_responses
from kvaas.api.schemas.caches import TAG_PATTERN
from kvaas.api.schemas.tags import TagDeleted, TagList, TagObject, TagPut
from kvaas.errors import AuthenticationError, Conflict, NotFound, PermissionDenied
from kvaas.services import listing

router = APIRouter(prefix="/v1", tags=["tags"])

TagName = Annotated[
    str,
    Path(
        pattern=TAG_PATTERN,
        description="1-64 characters of `A-Z a-z 0-9 . _ -`, unique per tenant.",
    ),
]
_ERRORS = (AuthenticationError, PermissionDenied, NotFound)


@router.put(
    "/tags/{tag}",
    dependencies=[require_scope("caches:write")],
    summary="Point a tag at a cache (create it, or re-point it atomically)",
    responses=error_responses(*_ERRORS, Conflict),
)
async def put_tag(
    tag: TagName, body: TagPut, auth: Auth, session: SessionDep, service: CacheServiceDep
) -> TagObject:
    return TagObject.of(await service.put_tag(session, auth.tenant, tag, body.cache_id))


@router.get(
    "/tags",
    dependencies=[require_scope("caches:read")],
    summary="List tags (by name, cursor pagination)",
    responses=error_responses(AuthenticationError, PermissionDenied),
)
async def list_tags(
    auth: Auth,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=listing.MAX_LIMIT)] = 100,
    after: Annotated[str | None, Query(max_length=512)] = None,
) -> TagList:
    page = await listing.list_tags(session, auth.tenant.id, limit=limit, after=after)
    return TagList(
        data=[TagObject.of(t) for t in page.rows],
        has_more=page.has_more,
        next_cursor=page.next_cursor,
    )


@router.get(
    "/tags/{tag}",
    dependencies=[require_scope("caches:read")],
    summary="Get a tag",
    responses=error_responses(*_ERRORS),
)
async def get_tag(
    tag: TagName, auth: Auth, session: SessionDep, service: CacheServiceDep
) -> TagObject:
    return TagObject.of(await service.get_tag(session, auth.tenant, tag))


@router.delete(
    "/tags/{tag}",
    dependencies=[require_scope("caches:write")],
    summary="Delete a tag",
    responses=error_responses(*_ERRORS),
)
async def delete_tag(
    tag: TagName, auth: Auth, session: SessionDep, service: CacheServiceDep
) -> TagDeleted:
    await service.delete_tag(session, auth.tenant, tag)
    return TagDeleted(name=tag)
