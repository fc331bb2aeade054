"""Body of ``/v1/me``."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Me(BaseModel):
    object: str = "tenant"
    tenant_id: str
    tenant_name: str
    status: str
    storage_quota_tokens: int | None
    storage_quota_bytes: int | None
    key_id: str
    key_display: str = Field(description="The calling key as shown in listings.")
    scopes: list[str]
