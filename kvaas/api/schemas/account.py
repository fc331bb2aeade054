"""Body of ``/v1/me``."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Me(BaseModel):
    object: str = "tenant"
    tenant_id: str
    tenant_name: str
    status: str
    storage_quota_tokens: int | None = Field(
        description="Tokens the tenant may store (its own quota, else the service default); "
        "null: unlimited."
    )
    storage_quota_bytes: int | None = Field(
        description="Bytes the tenant may store (its own quota, else the service default); "
        "null: unlimited."
    )
    max_caches: int = Field(description="Live caches the tenant may hold at once.")
    key_id: str
    key_display: str = Field(description="The calling key as shown in listings.")
    scopes: list[str]
