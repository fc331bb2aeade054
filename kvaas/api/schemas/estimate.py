"""Bodies of ``POST /v1/cache/estimate``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kvaas.api.schemas.bounds import INT32_MAX
from kvaas.api.schemas.caches import Compression, PromptFields, StorageClass


class EstimateRequest(PromptFields):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "<long document>", "ttl_seconds": 10800, "expected_attaches": 20}
            ]
        },
    )
    storage_class: StorageClass | None = Field(None, description="Default: the service's.")
    compression: Compression | None = Field(None, description="Default: the service's.")
    ttl_seconds: int | None = Field(
        None, ge=1, le=INT32_MAX, description="How long the cache is kept."
    )
    expected_attaches: int | None = Field(None, ge=0, le=10**9)


class StoredSize(BaseModel):
    bytes: int = Field(description="Bytes stored for the prompt's chunks.")
    ratio: float = Field(description="Uncompressed KV bytes / stored bytes.")
    exact: bool = Field(description="False: estimated from the codec's measured ratio.")


class Comparison(BaseModel):
    attaches: int
    with_cache: str
    without_cache: str
    savings: str


class Estimate(BaseModel):
    object: Literal["cache_estimate"] = "cache_estimate"
    model: str
    tokens: int
    stored_tokens: int = Field(
        description="Tokens stored and read on attach (every chunk, the partial last one too)."
    )
    chunk_tokens: int
    kv_bytes_per_token: int = Field(description="Uncompressed KV bytes per token.")
    storage_class: StorageClass
    compression: Compression
    ttl_seconds: int
    stored_bytes: int = Field(description="Stored bytes with the chosen compression.")
    stored_bytes_by_compression: dict[str, StoredSize]
    currency: str
    pricebook_version: str
    storage_price_per_hour: str = Field(description="Storage of this cache for one hour.")
    storage_cost_for_ttl: str
    create_cost: str = Field(description="Prefill of the prompt at create.")
    attach_cost: str = Field(description="Per attach: cached read plus the unstored tail.")
    resend_cost: str = Field(description="Per request re-sending the prompt without a cache.")
    break_even_attaches: int | None = Field(
        description="Attaches after which caching costs no more than re-sending the prompt; "
        "null when it never does."
    )
    expected: Comparison | None = None
