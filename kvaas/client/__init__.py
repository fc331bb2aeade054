"""Python client for the KVaaS REST API: :class:`KVaaS` (sync) and :class:`AsyncKVaaS` (async).

    from kvaas.client import KVaaS

    with KVaaS("http://127.0.0.1:8000", api_key="kvs_...") as kv:
        cache = kv.create_cache(prompt=long_document, ttl_seconds=3600)
        out = kv.attach(cache.id, prompt="\\nQ: what is the term?\\nA:", max_tokens=64)
        print(out.text, out.usage.cached_tokens)
        for chunk in kv.attach_stream(cache.id, prompt="...", max_tokens=64):
            print(chunk.text, end="")

Contract:

- every error answer raises a :class:`KVaaSError` subclass chosen by the error's ``type``
  (else by HTTP status), carrying ``status_code``, ``type``, ``message``, ``param``,
  ``request_id`` and the parsed error ``body``; transport failures raise
  :class:`APIConnectionError`;
- ``429`` with ``Retry-After`` and ``503`` (and 502/504, connection failures, and a ``409``
  for an idempotency key whose first request is still running) are retried up to
  ``max_retries`` times with exponential backoff and jitter, honouring ``Retry-After``;
- every POST carries an ``Idempotency-Key`` generated once per call (or the one given), so a
  retried POST never runs twice on the server;
- listings (:meth:`KVaaS.list_caches`, :meth:`KVaaS.list_tags`) are iterators that fetch the
  next page (the answer's ``next_cursor``, sent back as ``after``) as they go.

Objects are pydantic models that keep every field the server sends (unknown ones too, as
attributes).

The endpoints are described once, in :mod:`kvaas.client.endpoints`; both clients run those
descriptions (:mod:`kvaas.client._sync`, :mod:`kvaas.client._async`) with the retry policy of
:mod:`kvaas.client._base`.
"""

from ._async import AsyncKVaaS
from ._base import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT
from ._base import RETRY_STATUSES as RETRY_STATUSES
from ._sync import KVaaS
from .errors import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    CacheLimitExceededError,
    CacheMissError,
    ConflictError,
    EngineUnavailableError,
    IdempotencyConflictError,
    InternalServerError,
    KVaaSError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    ServiceUnavailableError,
    ValidationError,
)
from .errors import error_from_body as error_from_body
from .types import APIObject, AttachChunk, AttachResult, Cache
from .types import AttachCacheInfo as AttachCacheInfo
from .types import AttachChoice as AttachChoice
from .types import AttachUsage as AttachUsage
from .types import Model as Model

__all__ = [
    "APIConnectionError",
    "APIObject",
    "AsyncKVaaS",
    "AttachChunk",
    "AttachResult",
    "AuthenticationError",
    "BadRequestError",
    "Cache",
    "CacheLimitExceededError",
    "CacheMissError",
    "ConflictError",
    "EngineUnavailableError",
    "IdempotencyConflictError",
    "InternalServerError",
    "KVaaS",
    "KVaaSError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "RateLimitError",
    "ServiceUnavailableError",
    "ValidationError",
]
