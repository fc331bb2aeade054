"""Every endpoint of the API, described once for both clients.

Each function below takes the method's arguments and returns the description of its request
(:mod:`kvaas.client._spec`); :func:`~kvaas.client._spec.one` and
:func:`~kvaas.client._spec.many` make it a method of :class:`~kvaas.client.KVaaS` and
:class:`~kvaas.client.AsyncKVaaS` with the same signature. The functions take no ``self``: they
only describe. Adding an endpoint to the clients is adding one function here.

Bodies leave out the arguments that are ``None``; ``extra`` adds fields this client does not
name (they win over the named ones).
"""

from __future__ import annotations

from typing import Any

from ._spec import Call, Listing, Stream, body, items_of, many, one, optional, seg
from .types import APIObject, AttachChunk, AttachResult, Cache, Model

Messages = list[dict[str, str]]


def _prompt(
    prompt: str | None, messages: Messages | None, token_ids: list[int] | None
) -> dict[str, Any]:
    return body(prompt=prompt, messages=messages, token_ids=token_ids)


class Endpoints:
    """The API's methods; see the module docstring."""

    # caches -------------------------------------------------------------------------------------
    @one
    def create_cache(
        *,
        prompt: str | None = None,
        messages: Messages | None = None,
        token_ids: list[int] | None = None,
        name: str | None = None,
        ttl_seconds: int | None = None,
        storage_class: str | None = None,
        compression: str | None = None,
        metadata: dict[str, str] | None = None,
        model: str | None = None,
        idempotency_key: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Call[Cache]:
        """Prefill a prompt prefix (exactly one of ``prompt``, ``messages``, ``token_ids``) and
        store its KV cache."""
        fields = body(
            name=name,
            ttl_seconds=ttl_seconds,
            storage_class=storage_class,
            compression=compression,
            metadata=metadata,
            model=model,
            extra=extra,
        )
        return Call(
            "POST",
            "/v1/cache/create",
            Cache.model_validate,
            json={**_prompt(prompt, messages, token_ids), **fields},
            idempotency_key=idempotency_key,
        )

    @one
    def attach(
        cache_id: str | None = None,
        *,
        prompt: str | None = None,
        messages: Messages | None = None,
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
    ) -> Call[AttachResult]:
        """Generate with the cache (by id, or by ``tag``) as the prompt's prefix."""
        fields = body(
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
        return Call(
            "POST",
            "/v1/cache/attach",
            AttachResult.model_validate,
            json={**body(cache_id=cache_id), **_prompt(prompt, messages, token_ids), **fields},
            idempotency_key=idempotency_key,
        )

    @many
    def attach_stream(
        cache_id: str | None = None,
        *,
        prompt: str | None = None,
        messages: Messages | None = None,
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
    ) -> Stream[AttachChunk]:
        """Like :meth:`attach`, streaming: yields chunks as tokens are generated; the last one
        carries ``usage`` and ``cache``."""
        request = Endpoints.attach.build(**locals())  # attach's request, every argument as given
        call = Call(
            "POST",
            request.path,
            AttachChunk.model_validate,
            json={**request.json, "stream": True},
            idempotency_key=request.idempotency_key,
        )
        return Stream(call)

    @many
    def list_caches(
        *,
        name: str | None = None,
        tag: str | None = None,
        status: str | None = None,
        model: str | None = None,
        page_size: int = 100,
    ) -> Listing[Cache]:
        """Every cache matching the filters, fetching pages as the iteration goes."""
        params = {"limit": page_size, "name": name, "tag": tag, "status": status, "model": model}
        return Listing("/v1/caches", Cache, params)

    @one
    def get_cache(cache_id: str) -> Call[Cache]:
        return Call("GET", f"/v1/caches/{seg(cache_id)}", Cache.model_validate)

    @one
    def update_cache(
        cache_id: str,
        *,
        name: str | None = None,
        ttl_seconds: int | None = None,
        storage_class: str | None = None,
        metadata: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Call[Cache]:
        fields = body(
            name=name,
            ttl_seconds=ttl_seconds,
            storage_class=storage_class,
            metadata=metadata,
            extra=extra,
        )
        return Call("PATCH", f"/v1/caches/{seg(cache_id)}", Cache.model_validate, json=fields)

    @one
    def delete_cache(cache_id: str) -> Call[APIObject | None]:
        return Call("DELETE", f"/v1/caches/{seg(cache_id)}", optional(APIObject))

    @one
    def extend_cache(
        cache_id: str,
        *,
        prompt: str | None = None,
        messages: Messages | None = None,
        token_ids: list[int] | None = None,
        idempotency_key: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Call[Cache]:
        """Append tokens to a cache as a new version (only the new chunks are computed)."""
        return Call(
            "POST",
            f"/v1/caches/{seg(cache_id)}/extend",
            Cache.model_validate,
            json={**_prompt(prompt, messages, token_ids), **(extra or {})},
            idempotency_key=idempotency_key,
        )

    @one
    def list_versions(cache_id: str) -> Call[list[APIObject]]:
        return Call("GET", f"/v1/caches/{seg(cache_id)}/versions", items_of(APIObject))

    @one
    def delete_version(cache_id: str, version: int) -> Call[APIObject | None]:
        path = f"/v1/caches/{seg(cache_id)}/versions/{seg(version)}"
        return Call("DELETE", path, optional(APIObject))

    # tags ---------------------------------------------------------------------------------------
    @one
    def put_tag(tag: str, cache_id: str) -> Call[APIObject]:
        return Call(
            "PUT", f"/v1/tags/{seg(tag)}", APIObject.model_validate, json={"cache_id": cache_id}
        )

    @one
    def get_tag(tag: str) -> Call[APIObject]:
        return Call("GET", f"/v1/tags/{seg(tag)}", APIObject.model_validate)

    @many
    def list_tags(*, page_size: int = 100) -> Listing[APIObject]:
        return Listing("/v1/tags", APIObject, {"limit": page_size})

    @one
    def delete_tag(tag: str) -> Call[APIObject | None]:
        return Call("DELETE", f"/v1/tags/{seg(tag)}", optional(APIObject))

    # estimates, usage, invoices, models ---------------------------------------------------------
    @one
    def estimate(**fields: Any) -> Call[APIObject]:
        """Price and size of a cache before creating it (``POST /v1/cache/estimate``)."""
        return Call("POST", "/v1/cache/estimate", APIObject.model_validate, json=fields)

    @one
    def usage(**params: Any) -> Call[APIObject]:
        """The tenant's usage (``GET /v1/usage``; e.g. ``granularity="day"``; ``from_`` is
        sent as ``from``)."""
        if "from_" in params:
            params["from"] = params.pop("from_")
        return Call("GET", "/v1/usage", APIObject.model_validate, params=params)

    @one
    def list_invoices(**params: Any) -> Call[list[APIObject]]:
        return Call("GET", "/v1/invoices", items_of(APIObject), params=params)

    @one
    def get_invoice(invoice_id: str) -> Call[APIObject]:
        return Call("GET", f"/v1/invoices/{seg(invoice_id)}", APIObject.model_validate)

    @one
    def models() -> Call[list[Model]]:
        return Call("GET", "/v1/models", items_of(Model))
