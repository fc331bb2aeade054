"""``POST /v1/cache/estimate``: what a cache of a prompt would hold and cost, before creating
it, and after how many attaches it pays off against re-sending the prompt."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from kvaas.api.caches import PromptFields
from kvaas.api.deps import Auth
from kvaas.api.errors import error_responses
from kvaas.billing.estimate import economics
from kvaas.billing.pricebook import PriceBook
from kvaas.codec.sizing import chunk_size, read_kv_shape
from kvaas.db.base import utcnow
from kvaas.errors import AuthenticationError, BadRequest, PermissionDenied
from kvaas.services.caches import CacheService, EngineUnavailable, Prompt

router = APIRouter(prefix="/v1", tags=["caches"])

StorageClass = Literal["hot", "standard", "cold"]
Compression = Literal["none", "lossless", "int8", "int4"]
SCHEMES: tuple[Compression, ...] = ("none", "lossless", "int8", "int4")


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
    ttl_seconds: int | None = Field(None, ge=1, description="How long the cache is kept.")
    expected_attaches: int | None = Field(None, ge=0, le=10**9)


class StoredSize(BaseModel):
    bytes: int = Field(description="Bytes stored for the whole chunks of the prompt.")
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
    stored_tokens: int = Field(description="Tokens in whole chunks: stored and read on attach.")
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


def _money(d: object) -> str:
    return format(d, "f")


@router.post(
    "/cache/estimate",
    summary="Estimate a cache's size, price and break-even before creating it",
    responses=error_responses(AuthenticationError, PermissionDenied, BadRequest, EngineUnavailable),
)
async def estimate_cache(body: EstimateRequest, auth: Auth, request: Request) -> Estimate:
    settings = request.app.state.settings
    service: CacheService = request.app.state.cache_service
    policy = service.prompts
    model = policy.engine.model
    prompt = Prompt(
        prompt=body.prompt,
        messages=[m.model_dump() for m in body.messages] if body.messages is not None else None,
        token_ids=body.token_ids,
    )
    ids = await policy.tokenize(prompt, continuation=False, generation_prompt=False)
    policy.require_tokens(ids)
    tokens = len(ids)
    ttl = body.ttl_seconds if body.ttl_seconds is not None else settings.default_ttl_seconds
    storage_class = body.storage_class or settings.default_storage_class
    compression = body.compression or settings.default_compression
    chunk = settings.chunk_tokens
    stored_tokens = (tokens // chunk) * chunk
    shape = read_kv_shape(model.path, settings.engine_dtype)
    raw_chunk = shape.bytes_per_token * chunk
    sizes: dict[str, StoredSize] = {}
    for scheme in SCHEMES:
        size = await asyncio.to_thread(chunk_size, shape, chunk, scheme)
        sizes[scheme] = StoredSize(
            bytes=size.expected * (tokens // chunk),
            ratio=round(raw_chunk / size.expected, 4),
            exact=size.exact,
        )
    pricebook: PriceBook = request.app.state.pricebook
    prices = pricebook.version_for(utcnow())
    econ = economics(tokens, stored_tokens, ttl, storage_class, prices)
    expected = None
    if body.expected_attaches is not None:
        n = body.expected_attaches
        w, wo = econ.with_cache(n), econ.without_cache(n)
        expected = Comparison(
            attaches=n, with_cache=_money(w), without_cache=_money(wo), savings=_money(wo - w)
        )
    return Estimate(
        model=model.name,
        tokens=tokens,
        stored_tokens=stored_tokens,
        chunk_tokens=chunk,
        kv_bytes_per_token=shape.bytes_per_token,
        storage_class=storage_class,
        compression=compression,
        ttl_seconds=ttl,
        stored_bytes=sizes[compression].bytes,
        stored_bytes_by_compression=sizes,
        currency=pricebook.currency,
        pricebook_version=prices.version,
        storage_price_per_hour=_money(econ.storage_per_hour),
        storage_cost_for_ttl=_money(econ.storage_for_ttl),
        create_cost=_money(econ.create),
        attach_cost=_money(econ.attach),
        resend_cost=_money(econ.resend),
        break_even_attaches=econ.break_even_attaches,
        expected=expected,
    )
