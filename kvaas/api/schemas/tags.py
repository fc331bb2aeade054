"""Bodies of the ``/v1/tags`` routes."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kvaas.api.schemas.caches import CacheIdText
from kvaas.db.models import CacheTag


class TagObject(BaseModel):
    object: Literal["tag"] = "tag"
    name: str
    cache_id: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, t: CacheTag) -> TagObject:
        return cls(
            name=t.name, cache_id=t.cache_id, created_at=t.created_at, updated_at=t.updated_at
        )


class TagList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TagObject]
    has_more: bool
    next_cursor: str | None


class TagPut(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"cache_id": "cache_0123456789abcdef01234567"}]},
    )
    cache_id: CacheIdText = Field(description="The cache the tag points at from now on.")


class TagDeleted(BaseModel):
    object: Literal["tag"] = "tag"
    name: str
    deleted: bool = True
