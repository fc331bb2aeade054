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
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import APIRouter, Depends, Header
from fastapi.responses import StreamingResponse
from fastapi.types import DecoratedCallable
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.api.deps import (
    Auth,
    AuthContext,
    CacheServiceDep,
    SessionDep,
    engine_work,
    require_scope,
)
from kvaas.api.errors import error_responses, stream_error_event
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
from kvaas.engine import Generation, Sampling
from kvaas.errors import AuthenticationError, BadRequest, NotFound, PermissionDenied
from kvaas.services.caches import CacheMiss, CacheRef, CacheService, EngineUnavailable, Prompt
from kvaas.services.fairness import EngineBusy
from kvaas.services.inference import Inference, Run, generate, generate_stream
from kvaas.services.streams import aclose

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


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


RequestT = TypeVar("RequestT", ChatCompletionRequest, CompletionRequest)
AnswerT = TypeVar("AnswerT", ChatCompletion, Completion)


@dataclass(frozen=True)
class _Kind(Generic[RequestT, AnswerT]):
    """What tells the chat and the text completion apart; :func:`_complete` does the rest."""

    id_prefix: str  # of the completion's id
    chunk_object: str  # ``object`` of a streamed chunk
    prompt: Callable[[RequestT], Prompt]
    sampling: Callable[[RequestT], Sampling]
    answer: type[AnswerT]
    choice: Callable[[Generation], Any]  # the answer's one choice
    delta: Callable[[str], dict[str, Any]]  # a streamed choice's content for some text
    opening: dict[str, Any] | None = None  # the content of a first choice streamed before any


_CHAT: _Kind[ChatCompletionRequest, ChatCompletion] = _Kind(
    id_prefix="chatcmpl",
    chunk_object="chat.completion.chunk",
    prompt=lambda body: Prompt(messages=[m.as_dict() for m in body.messages]),
    sampling=ChatCompletionRequest.chat_sampling,
    answer=ChatCompletion,
    choice=lambda g: ChatChoice(
        message=AssistantMessage(content=g.text), finish_reason=_finish(g.finish_reason)
    ),
    delta=lambda text: {"delta": {"content": text} if text else {}},
    opening={"delta": {"role": "assistant", "content": ""}},
)
_TEXT: _Kind[CompletionRequest, Completion] = _Kind(
    id_prefix="cmpl",
    chunk_object="text_completion",
    prompt=lambda body: (
        Prompt(prompt=body.prompt)
        if isinstance(body.prompt, str)
        else Prompt(token_ids=body.prompt)
    ),
    sampling=CompletionRequest.sampling,
    answer=Completion,
    choice=lambda g: CompletionChoice(text=g.text, finish_reason=_finish(g.finish_reason)),
    delta=lambda text: {"text": text},
)


@dataclass(frozen=True)
class _Caller:
    """Who asks (the API key's tenant), on what (session, cache service), and the
    ``X-KVaaS-Cache`` header."""

    auth: AuthContext
    session: AsyncSession
    service: CacheService
    cache_header: str | None


async def _caller(
    auth: Auth, session: SessionDep, service: CacheServiceDep, x_kvaas_cache: CacheHeader = None
) -> _Caller:
    return _Caller(auth, session, service, x_kvaas_cache)


Caller = Annotated[_Caller, Depends(_caller)]


async def _complete(kind: _Kind[RequestT, AnswerT], body: RequestT, caller: _Caller) -> AnswerT:
    """The completion ``body`` asks for: its answer, or with ``stream`` its server-sent
    events."""
    service = caller.service
    engine = service.prompts.engine
    service.prompts.check_model(body.model, NotFound)
    sampling = kind.sampling(body)
    prompt = kind.prompt(body)
    ref = _cache_ref(body, caller.cache_header)
    rid, created = f"{kind.id_prefix}-{uuid.uuid4().hex}", int(time.time())
    inf = Inference(service, caller.session, caller.auth.tenant, ref, prompt, sampling, rid)
    model = engine.model.name
    if body.stream:
        run, deltas = await generate_stream(inf)
        head = {"id": rid, "object": kind.chunk_object, "created": created, "model": model}
        return StreamingResponse(  # type: ignore[return-value]
            _event_stream(kind, head, run, deltas, body.include_usage),
            media_type="text/event-stream",
        )
    run = await generate(inf)
    return kind.answer(
        id=rid,
        created=created,
        model=model,
        choices=[kind.choice(run.generation)],
        usage=_usage(run),
        cache=_cache_info(run),
    )


async def _event_stream(
    kind: _Kind[Any, Any],
    head: dict[str, Any],
    run: Run,
    deltas: AsyncIterator[Generation],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """OpenAI chunks: the opening one when ``kind`` has one, one per delta, the usage chunk on
    request, then ``[DONE]``. An engine failure mid-stream is reported in-band. Closing this
    closes ``deltas`` (the request is metered then, its slot freed)."""

    def choice(content: dict[str, Any], reason: str | None) -> dict[str, Any]:
        return {"index": 0, **content, "logprobs": None, "finish_reason": _finish(reason)}

    if kind.opening is not None:
        yield _sse({**head, "choices": [choice(kind.opening, None)]})
    try:
        async for d in deltas:
            chunk = {**head, "choices": [choice(kind.delta(d.text), d.finish_reason)]}
            if d.finish_reason is not None and run.outcome is not None:
                info = _cache_info(run)
                chunk["cache"] = info.model_dump() if info else None
            yield _sse(chunk)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(run).model_dump()})
    except Exception as e:  # the status line is gone: report in-band
        yield _sse(stream_error_event(e))
    finally:
        await aclose(deltas)
    yield b"data: [DONE]\n\n"


COMPLETION_ERRORS = error_responses(
    BadRequest,
    AuthenticationError,
    PermissionDenied,
    NotFound,
    CacheMiss,
    EngineBusy,
    EngineUnavailable,
)
STREAM_200: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "The completion; with `stream: true`, server-sent events of chunk "
        "objects, then `data: [DONE]`.",
    }
}


def _completion_route(path: str, summary: str) -> Callable[[DecoratedCallable], DecoratedCallable]:
    """``POST path``, a completion route (its errors, and its answer streamed or not); it runs
    the engine and is billed, so it needs ``caches:write``."""
    return router.post(
        path,
        dependencies=[require_scope("caches:write"), engine_work()],
        summary=summary,
        responses={**COMPLETION_ERRORS, **STREAM_200},
    )


@_completion_route(
    "/chat/completions", "Chat completion (OpenAI-compatible), optionally on a stored cache"
)
async def create_chat_completion(body: ChatCompletionRequest, caller: Caller) -> ChatCompletion:
    return await _complete(_CHAT, body, caller)


@_completion_route(
    "/completions", "Text completion (OpenAI-compatible), optionally on a stored cache"
)
async def create_completion(body: CompletionRequest, caller: Caller) -> Completion:
    return await _complete(_TEXT, body, caller)


@router.get(
    "/models",
    dependencies=[require_scope("caches:read")],
    summary="List the served models (OpenAI-compatible)",
    responses=error_responses(AuthenticationError, PermissionDenied),
)
async def list_models(auth: Auth, service: CacheServiceDep) -> ModelList:
    """The model this gateway's engine serves (an empty list without an engine)."""
    if service.engine is None:
        return ModelList(data=[])
    return ModelList(data=[ModelCard(id=service.engine.model.name, created=0)])
