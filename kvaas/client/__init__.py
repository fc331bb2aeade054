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
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict

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

DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
RETRY_STATUSES = frozenset({429, 502, 503, 504})


# --- errors -------------------------------------------------------------------------------------
class KVaaSError(Exception):
    """An error answer of the API (or, for :class:`APIConnectionError`, no answer at all)."""

    status_code: int | None = None
    type: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        type: str | None = None,
        param: str | None = None,
        request_id: str | None = None,
        body: dict[str, Any] | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        if type is not None:
            self.type = type
        self.param = param
        self.request_id = request_id
        self.body = body or {}
        self.response = response

    def __str__(self) -> str:
        where = f" [{self.request_id}]" if self.request_id else ""
        return f"{self.status_code} {self.type}: {self.message}{where}"


class APIConnectionError(KVaaSError):
    """The server could not be reached, or the connection broke."""


class BadRequestError(KVaaSError):
    status_code, type = 400, "invalid_request_error"


class AuthenticationError(KVaaSError):
    status_code, type = 401, "authentication_error"


class PermissionDeniedError(KVaaSError):
    status_code, type = 403, "permission_error"


class NotFoundError(KVaaSError):
    status_code, type = 404, "not_found_error"


class ConflictError(KVaaSError):
    status_code, type = 409, "conflict_error"


class CacheMissError(ConflictError):
    type = "cache_miss"


class IdempotencyConflictError(ConflictError):
    type = "idempotency_conflict"


class QuotaExceededError(KVaaSError):
    status_code, type = 402, "quota_exceeded"


class PayloadTooLargeError(KVaaSError):
    status_code, type = 413, "payload_too_large"


class ValidationError(KVaaSError):
    status_code, type = 422, "validation_error"


class RateLimitError(KVaaSError):
    status_code, type = 429, "rate_limit_error"


class CacheLimitExceededError(RateLimitError):
    type = "cache_limit_exceeded"


class InternalServerError(KVaaSError):
    status_code, type = 500, "internal_error"


class ServiceUnavailableError(KVaaSError):
    status_code, type = 503, "service_unavailable"


class EngineUnavailableError(ServiceUnavailableError):
    type = "engine_unavailable"


_BY_TYPE: dict[str, type[KVaaSError]] = {
    c.type: c  # type: ignore[misc]
    for c in (
        BadRequestError,
        AuthenticationError,
        PermissionDeniedError,
        NotFoundError,
        ConflictError,
        CacheMissError,
        IdempotencyConflictError,
        QuotaExceededError,
        PayloadTooLargeError,
        ValidationError,
        RateLimitError,
        CacheLimitExceededError,
        InternalServerError,
        ServiceUnavailableError,
        EngineUnavailableError,
    )
}
_BY_STATUS: dict[int, type[KVaaSError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    402: QuotaExceededError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: ValidationError,
    429: RateLimitError,
    500: InternalServerError,
    503: ServiceUnavailableError,
}


def error_from_body(
    status: int | None, body: Any, response: httpx.Response | None = None
) -> KVaaSError:
    """The exception for an error body ``{"error": {type, message, ...}}``."""
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        detail = {"message": str(body)[:500] if body else f"HTTP {status}"}
    etype = detail.get("type")
    cls = _BY_TYPE.get(etype or "") or _BY_STATUS.get(status or 0) or KVaaSError
    request_id = detail.get("request_id") or (
        response.headers.get("x-request-id") if response is not None else None
    )
    return cls(
        str(detail.get("message", "")),
        status_code=status,
        type=etype,
        param=detail.get("param"),
        request_id=request_id,
        body=detail,
        response=response,
    )


def _retryable(r: httpx.Response) -> bool:
    """502-504, and a 429 or 409 that says when to come back (``Retry-After``: a rate limit,
    an idempotency key whose first request is still running). A 429 without it (a limit on
    how many caches a tenant holds) is final."""
    return r.status_code in RETRY_STATUSES or (r.status_code == 409 and "retry-after" in r.headers)


def _error_from_response(r: httpx.Response) -> KVaaSError:
    try:
        body: Any = r.json()
    except ValueError:
        body = r.text
    return error_from_body(r.status_code, body, r)


# --- objects ------------------------------------------------------------------------------------
class APIObject(BaseModel):
    """Any object the API returns; every field is an attribute, known or not."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Cache(APIObject):
    id: str
    object: str = "cache"
    status: str | None = None
    name: str | None = None
    model: str | None = None
    version: int | None = None
    tokens: int | None = None
    stored_tokens: int | None = None
    stored_bytes: int | None = None
    compression: str | None = None
    storage_class: str | None = None
    metadata: dict[str, str] | None = None


class AttachUsage(APIObject):
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefill_tokens: int = 0
    output_tokens: int = 0
    ttft_ms: float | None = None


class AttachCacheInfo(APIObject):
    id: str | None = None
    hit: bool = False
    miss_reason: str | None = None


class AttachChoice(APIObject):
    index: int = 0
    text: str = ""
    token_ids: list[int] = []
    finish_reason: str | None = None


class AttachResult(APIObject):
    id: str
    model: str | None = None
    choices: list[AttachChoice]
    usage: AttachUsage
    cache: AttachCacheInfo

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""


class AttachChunk(APIObject):
    """One streamed event; the last one carries ``usage`` and ``cache``."""

    id: str | None = None
    choices: list[AttachChoice] = []
    usage: AttachUsage | None = None
    cache: AttachCacheInfo | None = None

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.choices)


class Model(APIObject):
    id: str


T = TypeVar("T", bound=APIObject)


# --- requests -----------------------------------------------------------------------------------
@dataclass
class _Call:
    """One logical API call (retries reuse it, idempotency key included)."""

    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def make(
        cls,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> _Call:
        headers = {}
        if method == "POST":
            headers["Idempotency-Key"] = idempotency_key or f"kvc-{uuid.uuid4().hex}"
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        return cls(method, path, json, clean or None, headers)


def _seg(value: str | int) -> str:
    return quote(str(value), safe="")


def _body(**fields: Any) -> dict[str, Any]:
    """A request body without the unset (``None``) fields."""
    extra = fields.pop("extra", None) or {}
    return {**{k: v for k, v in fields.items() if v is not None}, **extra}


def _prompt_fields(
    prompt: str | None, messages: list[dict[str, str]] | None, token_ids: list[int] | None
) -> dict[str, Any]:
    return _body(prompt=prompt, messages=messages, token_ids=token_ids)


def _parse_sse_line(line: str) -> dict[str, Any] | None:
    """The JSON of a ``data:`` line (``None`` for other lines); raises on an in-band error.
    The end marker ``[DONE]`` yields ``{"done": True}``."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return {"done": True}
    event = json.loads(data)
    if isinstance(event, dict) and "error" in event and "choices" not in event:
        raise error_from_body(None, event)
    return event


class _Base:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        max_retries: int = 2,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        max_retry_after_s: float = 60.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_retry_after_s = max_retry_after_s

    def _default_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}", "User-Agent": "kvaas-python"}

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds to wait before retry ``attempt`` (0-based): ``Retry-After`` when the server
        sent one, else exponential backoff with jitter."""
        if response is not None:
            ra = response.headers.get("retry-after")
            if ra is not None:
                try:
                    return min(max(float(ra), 0.0), self.max_retry_after_s)
                except ValueError:
                    pass
        base = min(self.max_backoff_s, self.backoff_s * (2**attempt))
        return base * (0.5 + random.random() / 2)

    # endpoint descriptions shared by both clients ------------------------------------------
    @staticmethod
    def _create(
        prompt: str | None,
        messages: list[dict[str, str]] | None,
        token_ids: list[int] | None,
        idempotency_key: str | None,
        **fields: Any,
    ) -> _Call:
        body = {**_prompt_fields(prompt, messages, token_ids), **_body(**fields)}
        return _Call.make("POST", "/v1/cache/create", json=body, idempotency_key=idempotency_key)

    @staticmethod
    def _attach(
        cache_id: str | None,
        prompt: str | None,
        messages: list[dict[str, str]] | None,
        token_ids: list[int] | None,
        stream: bool,
        idempotency_key: str | None,
        **fields: Any,
    ) -> _Call:
        body = {
            **_body(cache_id=cache_id),
            **_prompt_fields(prompt, messages, token_ids),
            **_body(**fields),
        }
        if stream:
            body["stream"] = True
        return _Call.make("POST", "/v1/cache/attach", json=body, idempotency_key=idempotency_key)


def _cursor_params(cursor: str | None) -> dict[str, str | None]:
    """The next page's query: the previous page's ``next_cursor`` as ``after``."""
    return {"after": cursor}


def _page_items(page: Any) -> tuple[list[Any], str | None]:
    data = page.get("data", []) if isinstance(page, dict) else page
    cursor = page.get("next_cursor") if isinstance(page, dict) else None
    if isinstance(page, dict) and page.get("has_more") is False:
        cursor = None
    return list(data), cursor


class KVaaS(_Base):
    """Synchronous client. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        http_client: httpx.Client | None = None,
        **retry: Any,
    ) -> None:
        super().__init__(base_url, api_key, **retry)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> KVaaS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # transport ------------------------------------------------------------------------------
    def _send(self, call: _Call, *, stream: bool = False) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            request = self._http.build_request(
                call.method,
                self.base_url + call.path,
                json=call.json,
                params=call.params,
                headers={**self._default_headers(), **call.headers},
            )
            try:
                r = self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                if last:
                    raise APIConnectionError(f"{type(e).__name__}: {e}") from e
                time.sleep(self._delay(attempt, None))
                continue
            if _retryable(r) and not last:
                r.close()
                time.sleep(self._delay(attempt, r))
                continue
            if r.status_code >= 400:
                if stream:
                    r.read()
                    r.close()
                raise _error_from_response(r)
            return r
        raise AssertionError("unreachable")

    def _json(self, call: _Call) -> Any:
        r = self._send(call)
        return None if r.status_code == 204 or not r.content else r.json()

    def _paginate(self, path: str, params: dict[str, Any], cls: type[T]) -> Iterator[T]:
        cursor: str | None = None
        while True:
            page = self._json(_Call.make("GET", path, params={**params, **_cursor_params(cursor)}))
            items, cursor = _page_items(page)
            for item in items:
                yield cls.model_validate(item)
            if not cursor or not items:
                return

    # caches -----------------------------------------------------------------------------------
    def create_cache(
        self,
        *,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        token_ids: list[int] | None = None,
        name: str | None = None,
        ttl_seconds: int | None = None,
        storage_class: str | None = None,
        compression: str | None = None,
        metadata: dict[str, str] | None = None,
        model: str | None = None,
        idempotency_key: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Cache:
        """Prefill a prompt prefix (exactly one of ``prompt``, ``messages``, ``token_ids``) and
        store its KV cache."""
        call = self._create(
            prompt,
            messages,
            token_ids,
            idempotency_key,
            name=name,
            ttl_seconds=ttl_seconds,
            storage_class=storage_class,
            compression=compression,
            metadata=metadata,
            model=model,
            extra=extra,
        )
        return Cache.model_validate(self._json(call))

    def attach(
        self,
        cache_id: str | None = None,
        *,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        token_ids: list[int] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        logprobs: int | None = None,
        require_hit: bool | None = None,
        tag: str | None = None,
        version: int | None = None,
        idempotency_key: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> AttachResult:
        """Generate with the cache (by id, or by ``tag``) as the prompt's prefix."""
        call = self._attach(
            cache_id,
            prompt,
            messages,
            token_ids,
            False,
            idempotency_key,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            logprobs=logprobs,
            require_hit=require_hit,
            tag=tag,
            version=version,
            extra=extra,
        )
        return AttachResult.model_validate(self._json(call))

    def attach_stream(
        self,
        cache_id: str | None = None,
        *,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        token_ids: list[int] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        require_hit: bool | None = None,
        tag: str | None = None,
        version: int | None = None,
        idempotency_key: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Iterator[AttachChunk]:
        """Like :meth:`attach`, streaming: yields chunks as tokens are generated."""
        call = self._attach(
            cache_id,
            prompt,
            messages,
            token_ids,
            True,
            idempotency_key,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            require_hit=require_hit,
            tag=tag,
            version=version,
            extra=extra,
        )
        r = self._send(call, stream=True)
        try:
            for line in r.iter_lines():
                event = _parse_sse_line(line)
                if event is None:
                    continue
                if event.get("done"):
                    return
                yield AttachChunk.model_validate(event)
        except httpx.TransportError as e:
            raise APIConnectionError(f"the stream broke: {e}") from e
        finally:
            r.close()

    def list_caches(
        self,
        *,
        name: str | None = None,
        tag: str | None = None,
        status: str | None = None,
        model: str | None = None,
        page_size: int = 100,
    ) -> Iterator[Cache]:
        """Every cache matching the filters, fetching pages as the iteration goes."""
        params = {"limit": page_size, "name": name, "tag": tag, "status": status, "model": model}
        return self._paginate("/v1/caches", params, Cache)

    def get_cache(self, cache_id: str) -> Cache:
        return Cache.model_validate(self._json(_Call.make("GET", f"/v1/caches/{_seg(cache_id)}")))

    def update_cache(
        self,
        cache_id: str,
        *,
        name: str | None = None,
        ttl_seconds: int | None = None,
        storage_class: str | None = None,
        metadata: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Cache:
        body = _body(
            name=name,
            ttl_seconds=ttl_seconds,
            storage_class=storage_class,
            metadata=metadata,
            extra=extra,
        )
        call = _Call.make("PATCH", f"/v1/caches/{_seg(cache_id)}", json=body)
        return Cache.model_validate(self._json(call))

    def delete_cache(self, cache_id: str) -> APIObject | None:
        out = self._json(_Call.make("DELETE", f"/v1/caches/{_seg(cache_id)}"))
        return APIObject.model_validate(out) if out else None

    def extend_cache(
        self,
        cache_id: str,
        *,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        token_ids: list[int] | None = None,
        idempotency_key: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Cache:
        """Append tokens to a cache as a new version (only the new chunks are computed)."""
        body = {**_prompt_fields(prompt, messages, token_ids), **(extra or {})}
        call = _Call.make(
            "POST",
            f"/v1/caches/{_seg(cache_id)}/extend",
            json=body,
            idempotency_key=idempotency_key,
        )
        return Cache.model_validate(self._json(call))

    def list_versions(self, cache_id: str) -> list[APIObject]:
        page = self._json(_Call.make("GET", f"/v1/caches/{_seg(cache_id)}/versions"))
        return [APIObject.model_validate(v) for v in _page_items(page)[0]]

    def delete_version(self, cache_id: str, version: int) -> APIObject | None:
        path = f"/v1/caches/{_seg(cache_id)}/versions/{_seg(version)}"
        out = self._json(_Call.make("DELETE", path))
        return APIObject.model_validate(out) if out else None

    # tags -------------------------------------------------------------------------------------
    def put_tag(self, tag: str, cache_id: str) -> APIObject:
        call = _Call.make("PUT", f"/v1/tags/{_seg(tag)}", json={"cache_id": cache_id})
        return APIObject.model_validate(self._json(call))

    def get_tag(self, tag: str) -> APIObject:
        return APIObject.model_validate(self._json(_Call.make("GET", f"/v1/tags/{_seg(tag)}")))

    def list_tags(self, *, page_size: int = 100) -> Iterator[APIObject]:
        return self._paginate("/v1/tags", {"limit": page_size}, APIObject)

    def delete_tag(self, tag: str) -> APIObject | None:
        out = self._json(_Call.make("DELETE", f"/v1/tags/{_seg(tag)}"))
        return APIObject.model_validate(out) if out else None

    # estimates, usage, invoices, models ----------------------------------------------------------
    def estimate(self, **body: Any) -> APIObject:
        """Price and size of a cache before creating it (``POST /v1/cache/estimate``)."""
        call = _Call.make("POST", "/v1/cache/estimate", json=body)
        return APIObject.model_validate(self._json(call))

    def usage(self, **params: Any) -> APIObject:
        """The tenant's usage (``GET /v1/usage``; e.g. ``granularity="day"``)."""
        if "from_" in params:
            params["from"] = params.pop("from_")
        return APIObject.model_validate(self._json(_Call.make("GET", "/v1/usage", params=params)))

    def list_invoices(self, **params: Any) -> list[APIObject]:
        page = self._json(_Call.make("GET", "/v1/invoices", params=params))
        return [APIObject.model_validate(v) for v in _page_items(page)[0]]

    def get_invoice(self, invoice_id: str) -> APIObject:
        call = _Call.make("GET", f"/v1/invoices/{_seg(invoice_id)}")
        return APIObject.model_validate(self._json(call))

    def models(self) -> list[Model]:
        page = self._json(_Call.make("GET", "/v1/models"))
        return [Model.model_validate(m) for m in _page_items(page)[0]]


class AsyncKVaaS(_Base):
    """Asynchronous client: the same methods as :class:`KVaaS`, awaitable; the iterators
    (:meth:`attach_stream`, :meth:`list_caches`, :meth:`list_tags`) are async iterators."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        http_client: httpx.AsyncClient | None = None,
        **retry: Any,
    ) -> None:
        super().__init__(base_url, api_key, **retry)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncKVaaS:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, call: _Call, *, stream: bool = False) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            request = self._http.build_request(
                call.method,
                self.base_url + call.path,
                json=call.json,
                params=call.params,
                headers={**self._default_headers(), **call.headers},
            )
            try:
                r = await self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                if last:
                    raise APIConnectionError(f"{type(e).__name__}: {e}") from e
                await asyncio.sleep(self._delay(attempt, None))
                continue
            if _retryable(r) and not last:
                await r.aclose()
                await asyncio.sleep(self._delay(attempt, r))
                continue
            if r.status_code >= 400:
                if stream:
                    await r.aread()
                    await r.aclose()
                raise _error_from_response(r)
            return r
        raise AssertionError("unreachable")

    async def _json(self, call: _Call) -> Any:
        r = await self._send(call)
        return None if r.status_code == 204 or not r.content else r.json()

    async def _paginate(self, path: str, params: dict[str, Any], cls: type[T]) -> AsyncIterator[T]:
        cursor: str | None = None
        while True:
            page = await self._json(
                _Call.make("GET", path, params={**params, **_cursor_params(cursor)})
            )
            items, cursor = _page_items(page)
            for item in items:
                yield cls.model_validate(item)
            if not cursor or not items:
                return

    async def create_cache(
        self,
        *,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        token_ids: list[int] | None = None,
        name: str | None = None,
        ttl_seconds: int | None = None,
        storage_class: str | None = None,
        compression: str | None = None,
        metadata: dict[str, str] | None = None,
        model: str | None = None,
        idempotency_key: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Cache:
        """See :meth:`KVaaS.create_cache`."""
        call = self._create(
            prompt,
            messages,
            token_ids,
            idempotency_key,
            name=name,
            ttl_seconds=ttl_seconds,
            storage_class=storage_class,
            compression=compression,
            metadata=metadata,
            model=model,
            extra=extra,
        )
        return Cache.model_validate(await self._json(call))

    async def attach(
        self,
        cache_id: str | None = None,
        *,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        token_ids: list[int] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        logprobs: int | None = None,
        require_hit: bool | None = None,
        tag: str | None = None,
        version: int | None = None,
        idempotency_key: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> AttachResult:
        """See :meth:`KVaaS.attach`."""
        call = self._attach(
            cache_id,
            prompt,
            messages,
            token_ids,
            False,
            idempotency_key,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            logprobs=logprobs,
            require_hit=require_hit,
            tag=tag,
            version=version,
            extra=extra,
        )
        return AttachResult.model_validate(await self._json(call))

    async def attach_stream(
        self,
        cache_id: str | None = None,
        *,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        token_ids: list[int] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        require_hit: bool | None = None,
        tag: str | None = None,
        version: int | None = None,
        idempotency_key: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> AsyncIterator[AttachChunk]:
        """See :meth:`KVaaS.attach_stream`."""
        call = self._attach(
            cache_id,
            prompt,
            messages,
            token_ids,
            True,
            idempotency_key,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            require_hit=require_hit,
            tag=tag,
            version=version,
            extra=extra,
        )
        r = await self._send(call, stream=True)
        try:
            async for line in r.aiter_lines():
                event = _parse_sse_line(line)
                if event is None:
                    continue
                if event.get("done"):
                    return
                yield AttachChunk.model_validate(event)
        except httpx.TransportError as e:
            raise APIConnectionError(f"the stream broke: {e}") from e
        finally:
            await r.aclose()

    def list_caches(
        self,
        *,
        name: str | None = None,
        tag: str | None = None,
        status: str | None = None,
        model: str | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[Cache]:
        params = {"limit": page_size, "name": name, "tag": tag, "status": status, "model": model}
        return self._paginate("/v1/caches", params, Cache)

    async def get_cache(self, cache_id: str) -> Cache:
        call = _Call.make("GET", f"/v1/caches/{_seg(cache_id)}")
        return Cache.model_validate(await self._json(call))

    async def update_cache(self, cache_id: str, **fields: Any) -> Cache:
        extra = fields.pop("extra", None)
        call = _Call.make(
            "PATCH", f"/v1/caches/{_seg(cache_id)}", json=_body(**fields, extra=extra)
        )
        return Cache.model_validate(await self._json(call))

    async def delete_cache(self, cache_id: str) -> APIObject | None:
        out = await self._json(_Call.make("DELETE", f"/v1/caches/{_seg(cache_id)}"))
        return APIObject.model_validate(out) if out else None

    async def extend_cache(
        self, cache_id: str, *, idempotency_key: str | None = None, **fields: Any
    ) -> Cache:
        extra = fields.pop("extra", None)
        call = _Call.make(
            "POST",
            f"/v1/caches/{_seg(cache_id)}/extend",
            json=_body(**fields, extra=extra),
            idempotency_key=idempotency_key,
        )
        return Cache.model_validate(await self._json(call))

    async def list_versions(self, cache_id: str) -> list[APIObject]:
        page = await self._json(_Call.make("GET", f"/v1/caches/{_seg(cache_id)}/versions"))
        return [APIObject.model_validate(v) for v in _page_items(page)[0]]

    async def delete_version(self, cache_id: str, version: int) -> APIObject | None:
        path = f"/v1/caches/{_seg(cache_id)}/versions/{_seg(version)}"
        out = await self._json(_Call.make("DELETE", path))
        return APIObject.model_validate(out) if out else None

    async def put_tag(self, tag: str, cache_id: str) -> APIObject:
        call = _Call.make("PUT", f"/v1/tags/{_seg(tag)}", json={"cache_id": cache_id})
        return APIObject.model_validate(await self._json(call))

    async def get_tag(self, tag: str) -> APIObject:
        return APIObject.model_validate(
            await self._json(_Call.make("GET", f"/v1/tags/{_seg(tag)}"))
        )

    def list_tags(self, *, page_size: int = 100) -> AsyncIterator[APIObject]:
        return self._paginate("/v1/tags", {"limit": page_size}, APIObject)

    async def delete_tag(self, tag: str) -> APIObject | None:
        out = await self._json(_Call.make("DELETE", f"/v1/tags/{_seg(tag)}"))
        return APIObject.model_validate(out) if out else None

    async def estimate(self, **body: Any) -> APIObject:
        call = _Call.make("POST", "/v1/cache/estimate", json=body)
        return APIObject.model_validate(await self._json(call))

    async def usage(self, **params: Any) -> APIObject:
        if "from_" in params:
            params["from"] = params.pop("from_")
        call = _Call.make("GET", "/v1/usage", params=params)
        return APIObject.model_validate(await self._json(call))

    async def list_invoices(self, **params: Any) -> list[APIObject]:
        page = await self._json(_Call.make("GET", "/v1/invoices", params=params))
        return [APIObject.model_validate(v) for v in _page_items(page)[0]]

    async def get_invoice(self, invoice_id: str) -> APIObject:
        call = _Call.make("GET", f"/v1/invoices/{_seg(invoice_id)}")
        return APIObject.model_validate(await self._json(call))

    async def models(self) -> list[Model]:
        page = await self._json(_Call.make("GET", "/v1/models"))
        return [Model.model_validate(m) for m in _page_items(page)[0]]
