"""Bodies of the operator API under ``/admin/api``."""

from __future__ import annotations

from datetime import datetime
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from kvaas.api.schemas.bounds import INT32_MAX, INT64_MAX
from kvaas.auth.keys import display_prefix
from kvaas.db.models import ApiKey


class TenantOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(examples=["ten_5c1f0a9e2b7d4c3a8e6f1b20"])
    object: str = "tenant"
    name: str = Field(examples=["acme"])
    status: str = Field(description="`active` or `disabled`.", examples=["active"])
    storage_quota_tokens: int | None = None
    storage_quota_bytes: int | None = None
    max_caches: int | None = Field(
        None, description="Most live caches (`null`: the `KVAAS_DEFAULT_MAX_CACHES` setting)."
    )
    created_at: datetime
    updated_at: datetime


class ApiKeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(examples=["key_0a1b2c3d4e5f60718293a4b5"])
    object: str = "api_key"
    tenant_id: str
    name: str
    prefix: str = Field(description="Public part of the key, shown in listings.")
    display: str = Field(description="How the key is shown: `kvs_<prefix>_…`.")
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, key: ApiKey) -> ApiKeyOut:
        return cls.model_validate(
            {**{c: getattr(key, c) for c in _KEY_COLS}, "display": display_prefix(key.prefix)}
        )


_KEY_COLS = (
    "id",
    "tenant_id",
    "name",
    "prefix",
    "scopes",
    "created_at",
    "last_used_at",
    "revoked_at",
)


class NewApiKeyOut(ApiKeyOut):
    secret: str = Field(description="The full API key. Shown once, never again.")


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=63, examples=["acme"])
    storage_quota_tokens: int | None = Field(None, ge=0, le=INT64_MAX)
    storage_quota_bytes: int | None = Field(None, ge=0, le=INT64_MAX)
    max_caches: int | None = Field(
        None, ge=0, le=INT32_MAX, description="Most live caches at once."
    )
    create_key: bool = Field(True, description="Also create the tenant's first API key.")


class TenantCreated(BaseModel):
    tenant: TenantOut
    api_key: NewApiKeyOut | None


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("default", min_length=1, max_length=64)
    scopes: list[str] = Field(default_factory=lambda: ["*"], examples=[["*"]])


T = TypeVar("T")


class ListOf(BaseModel, Generic[T]):
    object: str = "list"
    data: list[T]


class AuditEntryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    actor: str
    action: str
    target_type: str
    target_id: str
    tenant_id: str | None
    request_id: str | None
    details: dict[str, object]
