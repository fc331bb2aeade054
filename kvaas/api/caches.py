"""``/v1/cache/create`` and ``/v1/cache/attach``: store a prompt prefix's KV, and use it."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse

from kvaas.api.deps import Auth, CacheServiceDep, SessionDep, engine_work, require_scope
from kvaas.api.errors import error_responses, stream_error_event
from kvaas.api.schemas.caches import (
    AttachCacheInfo,
    AttachRequest,
    AttachResponse,
    AttachUsage,
    CacheObject,
    CacheUsage,
    Choice,
    CreateCacheRequest,
)
from kvaas.billing.budget import BudgetExceeded
from kvaas.errors import AuthenticationError, BadRequest, NotFound, PermissionDenied
from kvaas.metrics import record_ttft
from kvaas.services.caches import (
    AttachOutcome,
    CacheMiss,
    CacheRef,
    CreateSpec,
    EngineUnavailable,
    Progress,
)
from kvaas.services.fairness import EngineBusy
from kvaas.services.quotas import CacheLimitExceeded, QuotaExceeded
from kvaas.services.streams import aclose

router = APIRouter(prefix="/v1", tags=["caches"])


@router.post(
    "/cache/create",
    dependencies=[require_scope("caches:write"), engine_work()],
    summary="Prefill a prompt prefix and store its KV cache",
    status_code=201,
    responses={
        **error_responses(
            BadRequest,
            AuthenticationError,
            QuotaExceeded,
            BudgetExceeded,
            PermissionDenied,
            CacheLimitExceeded,
            EngineUnavailable,
            EngineBusy,
        ),
        202: {
            "model": CacheObject,
            "description": "With `wait: false`: the cache, `pending`; the prefill runs on.",
        },
    },
)
async def create_cache(
    body: CreateCacheRequest,
    auth: Auth,
    session: SessionDep,
    service: CacheServiceDep,
    response: Response,
) -> CacheObject:
    result = await service.create(
        session,
        auth.tenant,
        CreateSpec(
            prompt=body.to_prompt(),
            name=body.name,
            ttl_seconds=body.ttl_seconds,
            storage_class=body.storage_class,
            scheme=body.compression,
            metadata=body.metadata,
            model=body.model,
            refresh_on_hit=body.refresh_on_hit,
        ),
        wait=body.wait,
    )
    if result.prefill_tokens is None:  # accepted; the prefill runs in the background
        response.status_code = 202
        progress = await service.progress(auth.tenant, [result.cache])
        return CacheObject.of(result.cache, progress=progress.get(result.cache.id))
    record_ttft("create", result.ttft_ms, result.prefill_tokens)
    return CacheObject.of(
        result.cache,
        CacheUsage(
            prefill_tokens=result.prefill_tokens,
            ttft_ms=round(result.ttft_ms, 3) if result.ttft_ms is not None else None,
        ),
        progress=Progress(result.cache.tokens, result.cache.tokens),
    )


@router.post(
    "/cache/attach",
    dependencies=[require_scope("caches:write"), engine_work()],
    summary="Generate with a stored cache as the prompt's prefix",
    responses={
        **error_responses(
            BadRequest,
            AuthenticationError,
            PermissionDenied,
            NotFound,
            CacheMiss,
            EngineUnavailable,
            EngineBusy,
        ),
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "The completion; with `stream: true`, server-sent events: one "
            "`AttachResponse`-shaped delta per event, then `data: [DONE]`.",
        },
    },
)
async def attach_cache(
    body: AttachRequest, auth: Auth, session: SessionDep, service: CacheServiceDep
) -> AttachResponse:
    rid = f"att_{uuid.uuid4().hex[:24]}"
    ref = CacheRef(body.cache_id, body.tag, body.version, body.require_hit)
    prompt, sampling = body.to_prompt(), body.sampling()
    if body.stream:
        outcome, deltas = await service.attach_stream(
            session, auth.tenant, ref, prompt, sampling, rid
        )
        return StreamingResponse(  # type: ignore[return-value]
            _sse(rid, outcome, deltas), media_type="text/event-stream"
        )
    o = await service.attach(session, auth.tenant, ref, prompt, sampling, rid)
    g = o.generation
    record_ttft("attach", g.ttft_ms, o.prompt_tokens - o.cached_tokens)
    return AttachResponse(
        id=rid,
        model=o.cache.model,
        choices=[
            Choice(
                text=g.text,
                token_ids=g.token_ids,
                finish_reason=g.finish_reason,
                logprobs=[{str(t): v for t, v in d.items()} for d in g.logprobs]
                if g.logprobs
                else None,
            )
        ],
        usage=AttachUsage.of(o),
        cache=AttachCacheInfo.of(o),
    )


async def _sse(
    rid: str, outcome: AttachOutcome, deltas: AsyncIterator[Any]
) -> AsyncIterator[bytes]:
    """Server-sent events of an attach: one chunk per delta (the last with ``usage`` and
    ``cache``), then ``[DONE]``; a failure mid-stream is reported in-band. Closing this closes
    ``deltas`` (the attach is metered then, its slot freed)."""
    try:
        async for d in deltas:
            chunk: dict[str, Any] = {
                "id": rid,
                "object": "cache.attach.chunk",
                "model": outcome.cache.model,
                "choices": [
                    {
                        "index": 0,
                        "text": d.text,
                        "token_ids": d.token_ids,
                        "finish_reason": d.finish_reason,
                    }
                ],
            }
            if d.finish_reason is not None:
                chunk["usage"] = AttachUsage.of(outcome).model_dump()
                chunk["cache"] = AttachCacheInfo.of(outcome).model_dump()
            yield f"data: {json.dumps(chunk)}\n\n".encode()
    except Exception as e:  # the status line is gone: report in-band
        yield f"data: {json.dumps(stream_error_event(e))}\n\n".encode()
    finally:
        await aclose(deltas)
    yield b"data: [DONE]\n\n"
