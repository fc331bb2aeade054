"""OpenAI-compatible surface: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

Any OpenAI client works against it. A stored cache is attached with the extra body field
``cache_id`` or ``cache_tag`` (with the ``openai`` package: ``extra_body={"cache_id": ...}``;
``cache_version`` picks a version, ``require_hit`` refuses a miss) or the header
``X-KVaaS-Cache: <cache id or tag>``: the cache's tokens come first, the
request's messages or prompt after them, exactly as ``/v1/cache/attach`` does. Without a
cache the request simply runs on the engine (:mod:`kvaas.services.inference`).

``usage`` has OpenAI's fields, ``prompt_tokens_details.cached_tokens`` counting the prompt
tokens whose KV was loaded instead of computed; an attached request's answer also carries
``cache: {id, hit, miss_reason}``. Streaming follows OpenAI's server-sent events (``chunk``
objects, then ``data: [DONE]``); ``stream_options: {"include_usage": true}`` adds a last chunk
with ``usage`` and no choices. Errors keep the API's one error body.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import StreamingResponse

from kvaas.api.deps import Auth, CacheServiceDep, SessionDep
from kvaas.api.errors import error_responses
from kvaas.api.schemas.openai import (
    AssistantMessage,
    CacheFields,
    CacheInfo,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    CompletionUsage,
    ModelCard,
    ModelList,
    PromptTokensDetails,
)
from kvaas.engine import Generation
from kvaas.errors import AuthenticationError, BadRequest, NotFound, PermissionDenied
from kvaas.services.caches import CacheMiss, EngineUnavailable, Prompt
from kvaas.services.inference import CacheRef, Run, generate, generate_stream

router = APIRouter(prefix="/v1", tags=["openai"])

CACHE_HEADER = "X-KVaaS-Cache"
#: What a cache id looks like; any other ``X-KVaaS-Cache`` value is read as a tag.
CACHE_ID_RE = re.compile(r"^cache_[0-9a-f]{24}$")

CacheHeader = Annotated[
    str | None,
    Header(
        alias=CACHE_HEADER,
        max_length=64,
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="Cache id (`cache_…`) or tag to attach; the body's fields take precedence.",
    ),
]


def _cache_ref(body: CacheFields, header_value: str | None) -> CacheRef:
    """The cache to attach, from the body or else the ``X-KVaaS-Cache`` header."""
    if body.cache_id is not None and body.cache_tag is not None:
        raise BadRequest("give `cache_id` or `cache_tag`, not both", param="cache_id")
    cache_id, tag = body.cache_id, body.cache_tag
    if cache_id is None and tag is None and header_value:
        value = header_value.strip()
        cache_id, tag = (value, None) if CACHE_ID_RE.match(value) else (None, value)
    return CacheRef(cache_id, tag, body.cache_version, body.require_hit)


def _usage(run: Run) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=run.prompt_tokens,
        completion_tokens=run.completion_tokens,
        total_tokens=run.prompt_tokens + run.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=run.cached_tokens),
    )


def _cache_info(run: Run) -> CacheInfo | None:
    o = run.outcome
    if o is None:
        return None
    return CacheInfo(id=o.cache.id, hit=o.hit, miss_reason=o.miss_reason)


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


async def _event_stream(
    run: Run,
    deltas: AsyncIterator[Generation],
    include_usage: bool,
    head: Callable[[], dict[str, Any]],
    choice: Callable[[Generation | None], dict[str, Any]],
) -> AsyncIterator[bytes]:
    """OpenAI chunks: one per delta (the first ``choice(None)`` opens a chat message), the
    usage chunk on request, then ``[DONE]``. An engine failure mid-stream is reported in-band."""
    first = choice(None)
    if first:
        yield _sse({**head(), "choices": [first]})
    try:
        async for d in deltas:
            chunk = {**head(), "choices": [choice(d)]}
            if d.finish_reason is not None and run.outcome is not None:
                info = _cache_info(run)
                chunk["cache"] = info.model_dump() if info else None
            yield _sse(chunk)
        if include_usage:
            yield _sse({**head(), "choices": [], "usage": _usage(run).model_dump()})
    except Exception as e:  # the status line is gone: report in-band
        yield _sse({"error": {"type": "internal_error", "message": f"generation failed: {e}"}})
    yield b"data: [DONE]\n\n"


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


COMPLETION_ERRORS = error_responses(
    BadRequest, AuthenticationError, PermissionDenied, NotFound, CacheMiss, EngineUnavailable
)
STREAM_200: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "The completion; with `stream: true`, server-sent events of chunk "
        "objects, then `data: [DONE]`.",
    }
}


@router.post(
    "/chat/completions",
    summary="Chat completion (OpenAI-compatible), optionally on a stored cache",
    responses={**COMPLETION_ERRORS, **STREAM_200},
)
async def create_chat_completion(
    body: ChatCompletionRequest,
    auth: Auth,
    session: SessionDep,
    service: CacheServiceDep,
    x_kvaas_cache: CacheHeader = None,
) -> ChatCompletion:
    engine = service.prompts.engine
    service.prompts.check_model(body.model, NotFound)
    sampling = body.chat_sampling()
    prompt = Prompt(messages=[m.as_dict() for m in body.messages])
    ref = _cache_ref(body, x_kvaas_cache)
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), engine.model.name
    if body.stream:
        run, deltas = await generate_stream(service, session, auth.tenant, ref, prompt, sampling)

        def head() -> dict[str, Any]:
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
            }

        def choice(d: Generation | None) -> dict[str, Any]:
            if d is None:
                delta = {"role": "assistant", "content": ""}
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            delta = {"content": d.text} if d.text else {}
            return {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": _finish(d.finish_reason),
            }

        return StreamingResponse(  # type: ignore[return-value]
            _event_stream(run, deltas, body.include_usage, head, choice),
            media_type="text/event-stream",
        )
    run = await generate(service, session, auth.tenant, ref, prompt, sampling)
    g = run.generation
    return ChatCompletion(
        id=rid,
        created=created,
        model=model,
        choices=[
            ChatChoice(
                message=AssistantMessage(content=g.text), finish_reason=_finish(g.finish_reason)
            )
        ],
        usage=_usage(run),
        cache=_cache_info(run),
    )


@router.post(
    "/completions",
    summary="Text completion (OpenAI-compatible), optionally on a stored cache",
    responses={**COMPLETION_ERRORS, **STREAM_200},
)
async def create_completion(
    body: CompletionRequest,
    auth: Auth,
    session: SessionDep,
    service: CacheServiceDep,
    x_kvaas_cache: CacheHeader = None,
) -> Completion:
    engine = service.prompts.engine
    service.prompts.check_model(body.model, NotFound)
    sampling = body.sampling()
    prompt = (
        Prompt(prompt=body.prompt)
        if isinstance(body.prompt, str)
        else Prompt(token_ids=body.prompt)
    )
    ref = _cache_ref(body, x_kvaas_cache)
    rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), engine.model.name
    if body.stream:
        run, deltas = await generate_stream(service, session, auth.tenant, ref, prompt, sampling)

        def head() -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": model}

        def choice(d: Generation | None) -> dict[str, Any]:
            if d is None:
                return {}
            return {
                "index": 0,
                "text": d.text,
                "logprobs": None,
                "finish_reason": _finish(d.finish_reason),
            }

        return StreamingResponse(  # type: ignore[return-value]
            _event_stream(run, deltas, body.include_usage, head, choice),
            media_type="text/event-stream",
        )
    run = await generate(service, session, auth.tenant, ref, prompt, sampling)
    g = run.generation
    return Completion(
        id=rid,
        created=created,
        model=model,
        choices=[CompletionChoice(text=g.text, finish_reason=_finish(g.finish_reason))],
        usage=_usage(run),
        cache=_cache_info(run),
    )


@router.get(
    "/models",
    summary="List the served models (OpenAI-compatible)",
    responses=error_responses(AuthenticationError, PermissionDenied),
)
async def list_models(auth: Auth, service: CacheServiceDep) -> ModelList:
    """The model this gateway's engine serves (an empty list without an engine)."""
    if service.engine is None:
        return ModelList(data=[])
    return ModelList(data=[ModelCard(id=service.engine.model.name, created=0)])
