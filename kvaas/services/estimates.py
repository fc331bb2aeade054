"""What a cache of a prompt would hold and cost, before it is created (``POST
/v1/cache/estimate``), and after how many attaches it pays off.

The prompt is read by the prompt policy (same rules as a create: an engine must run, the
prompt is one non-empty form). Sizes come from :mod:`kvaas.codec.sizing` (the one place that
sizes a chunk: exact for the fixed-size schemes, the measured ratio for ``lossless``), prices
from :func:`kvaas.billing.estimate.economics` at the price-book version in force now. Every
token is stored (the last ``tokens % chunk_tokens`` as a partial chunk of their own) and read
on attach.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime

from kvaas.billing.estimate import Economics, economics
from kvaas.billing.pricebook import PriceBook
from kvaas.codec.sizing import chunk_size, read_kv_shape
from kvaas.config import Compression, Settings, StorageClass
from kvaas.db.base import utcnow
from kvaas.services.prompts import Prompt, PromptPolicy
from kvaas.store.keys import trailing_tokens

#: Every codec, in the order the estimate lists them.
SCHEMES: tuple[Compression, ...] = ("none", "lossless", "int8", "int4")


@dataclass(frozen=True)
class EstimateSpec:
    """What to estimate: the prompt and the cache's options (``None``: the service default)."""

    prompt: Prompt
    storage_class: StorageClass | None = None
    scheme: Compression | None = None
    ttl_seconds: int | None = None


@dataclass(frozen=True)
class SizeEstimate:
    """Stored bytes of the prompt's chunks (its partial last one included) with one scheme."""

    bytes: int
    ratio: float  # uncompressed KV bytes / stored bytes, 4 decimals
    exact: bool  # False: from the codec's measured ratio


@dataclass(frozen=True)
class CacheEstimate:
    """A cache's size and economics; money is exact decimals in ``currency``."""

    model: str
    tokens: int
    stored_tokens: int
    chunk_tokens: int
    kv_bytes_per_token: int
    storage_class: StorageClass
    scheme: Compression
    ttl_seconds: int
    sizes: dict[str, SizeEstimate]
    currency: str
    pricebook_version: str
    economics: Economics

    @property
    def stored_bytes(self) -> int:
        """Stored bytes with the chosen scheme."""
        return self.sizes[self.scheme].bytes


async def estimate_cache(
    policy: PromptPolicy,
    settings: Settings,
    pricebook: PriceBook,
    spec: EstimateSpec,
    *,
    now: datetime | None = None,
) -> CacheEstimate:
    """Estimate a cache of ``spec.prompt``. 503 without an engine, 400 for a bad prompt (both
    from the prompt policy). Chunk sizing and tokenizing run off the event loop."""
    model = policy.engine.model
    ids = await policy.tokenize(spec.prompt, continuation=False, generation_prompt=False)
    policy.require_tokens(ids)
    tokens = len(ids)
    ttl = spec.ttl_seconds if spec.ttl_seconds is not None else settings.default_ttl_seconds
    storage_class = spec.storage_class or settings.default_storage_class
    chosen = spec.scheme or settings.default_compression
    chunk = settings.chunk_tokens
    chunks = tokens // chunk  # full ones; the trailing partial chunk is sized on its own
    tail = trailing_tokens(tokens, chunk)
    shape = read_kv_shape(model.path, settings.engine_dtype)
    raw_chunk = shape.bytes_per_token * chunk
    sizes: dict[str, SizeEstimate] = {}
    for scheme in SCHEMES:
        size = await asyncio.to_thread(chunk_size, shape, chunk, scheme)
        last = await asyncio.to_thread(chunk_size, shape, tail, scheme) if tail else None
        sizes[scheme] = SizeEstimate(
            bytes=size.expected * chunks + (last.expected if last is not None else 0),
            ratio=round(raw_chunk / size.expected, 4),
            exact=size.exact and (last is None or last.exact),
        )
    prices = pricebook.version_for(now or utcnow())
    return CacheEstimate(
        model=model.name,
        tokens=tokens,
        stored_tokens=tokens,
        chunk_tokens=chunk,
        kv_bytes_per_token=shape.bytes_per_token,
        storage_class=storage_class,
        scheme=chosen,
        ttl_seconds=ttl,
        sizes=sizes,
        currency=pricebook.currency,
        pricebook_version=prices.version,
        economics=economics(tokens, tokens, ttl, storage_class, prices),
    )
