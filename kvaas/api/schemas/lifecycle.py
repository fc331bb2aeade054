"""Bodies of the cache lifecycle routes: listing, patching, extending, versions."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from kvaas.api.schemas.bounds import INT32_MAX
from kvaas.api.schemas.caches import (
    MAX_METADATA_PAIRS,
    METADATA_DESCRIPTION,
    CacheName,
    CacheObject,
    Metadata,
    OnePromptFields,
    StorageClass,
)
from kvaas.db.models import CacheVersion
from kvaas.services.caches import UNSET, CachePatch
from kvaas.store.keys import tokens_in_chunks


class CacheList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CacheObject]
    has_more: bool
    next_cursor: str | None = Field(
        description="Pass as `after` for the next page; `null` on the last page."
    )


class CachePatchRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"ttl_seconds": 86400, "storage_class": "cold"}]},
    )
    name: CacheName | None = Field(None, description="`null` clears it.")
    metadata: Metadata | None = Field(
        None,
        max_length=MAX_METADATA_PAIRS,
        description=f"Replaces the metadata. {METADATA_DESCRIPTION}",
    )
    ttl_seconds: int | None = Field(None, le=INT32_MAX, description="New lifetime, from now.")
    expires_at: AwareDatetime | None = Field(None, description="New expiry (instead of a TTL).")
    storage_class: StorageClass | None = Field(None, description="Moves the stored chunks.")
    refresh_on_hit: bool | None = Field(None, description="Each attach re-grants the TTL.")

    @model_validator(mode="after")
    def _check(self) -> CachePatchRequest:
        given = self.model_fields_set
        if {"ttl_seconds", "expires_at"} <= given:
            raise ValueError("give `ttl_seconds` or `expires_at`, not both")
        for f in ("metadata", "ttl_seconds", "expires_at", "storage_class", "refresh_on_hit"):
            if f in given and getattr(self, f) is None:
                raise ValueError(f"`{f}` cannot be null")
        return self

    def to_patch(self) -> CachePatch:
        """The service's patch: fields absent from the request stay :data:`UNSET`."""
        given = self.model_fields_set
        return CachePatch(
            **{
                f: getattr(self, f) if f in given else UNSET
                for f in CachePatch.__dataclass_fields__
            }
        )


class ExtendRequest(OnePromptFields):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"prompt": "\n\nAppendix B: ..."}]},
    )


class CacheVersionObject(BaseModel):
    object: Literal["cache.version"] = "cache.version"
    cache_id: str
    version: int
    status: Literal["pending", "ready", "failed", "deleted"]
    tokens: int
    stored_tokens: int = Field(description="Tokens whose KV is stored.")
    stored_bytes: int = Field(description="Bytes of this version's chunks (shared ones too).")
    prefix_sha256: str
    created_at: datetime
    deleted_at: datetime | None = None
    failure_reason: str | None = None

    @classmethod
    def of(cls, v: CacheVersion, chunk_tokens: int) -> CacheVersionObject:
        return cls(
            cache_id=v.cache_id,
            version=v.version,
            status=v.status,
            tokens=v.tokens,
            stored_tokens=(
                tokens_in_chunks(v.tokens, chunk_tokens, v.chunks) if v.status == "ready" else 0
            ),
            stored_bytes=v.stored_bytes,
            prefix_sha256=v.prefix_sha256,
            created_at=v.created_at,
            deleted_at=v.deleted_at,
            failure_reason=v.failure_reason,
        )


class CacheVersionList(BaseModel):
    object: Literal["list"] = "list"
    cache_id: str
    latest: int = Field(description="The version attached by default.")
    data: list[CacheVersionObject]
