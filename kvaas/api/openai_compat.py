"""OpenAI-compatible surface: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

Any OpenAI client works against it. A stored cache is attached with the extra body field
``cache_id`` or ``cache_tag`` (with the ``openai`` package: ``extra_body={"cache_id": ...}``;
``cache_version`` picks a version, ``require_hit`` refuses a miss) or the header
``X-KVaaS-Cache: <cache id or tag>``: the cache's tokens come first, the
request's messages or prompt after them, exactly as ``/v1/cache/attach`` does. Without a
cache the request simply runs on the engine.

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
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.api.caches import TAG_PATTERN
from kvaas.api.deps import Auth, SessionDep
from kvaas.api.errors import error_responses
from kvaas.db.models import Tenant
from kvaas.engine import EngineError, Generation, Sampling
from kvaas.errors import (
    AuthenticationError,
    BadRequest,
    NotFound,
    PermissionDenied,
    ServiceUnavailable,
)
from kvaas.services.caches import (
    AttachOutcome,
    CacheMiss,
    CacheService,
    EngineUnavailable,
    Prompt,
)

router = APIRouter(prefix="/v1", tags=["openai"])

CACHE_HEADER = "X-KVaaS-Cache"
#: What a cache id looks like; any other ``X-KVaaS-Cache`` value is read as a tag.
CACHE_ID_RE = re.compile(r"^cache_[0-9a-f]{24}$")
#: Characters a cache id may hold (ids are ``cache_<hex>``); anything else cannot name one.
CACHE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_PROMPT_CHARS = 1_000_000
MAX_TOKEN_IDS = 131_072
MAX_OUTPUT_TOKENS = 8192


# --- request bodies ---------------------------------------------------------------------------
class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="Text, or a list of text parts.")
    name: str | None = Field(None, max_length=64)

    def as_dict(self) -> dict[str, str]:
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class CacheFields(BaseModel):
    """KVaaS extensions (pass them with ``extra_body``)."""

    cache_id: str | None = Field(
        None, max_length=64, pattern=CACHE_ID_PATTERN, description="Attach this cache first."
    )
    cache_tag: str | None = Field(
        None, pattern=TAG_PATTERN, description="Attach the cache this tag points at first."
    )
    cache_version: int | None = Field(
        None, ge=1, description="Version of the cache to attach (default: the latest)."
    )
    require_hit: bool = Field(
        False, description="Answer 409 `cache_miss` instead of recomputing a missed cache."
    )


class SamplingFields(BaseModel):
    model: str | None = Field(None, max_length=256, description="Must name the served model.")
    max_tokens: int | None = Field(None, ge=1, le=MAX_OUTPUT_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)

    def sampling(self, default_max_tokens: int = 16) -> Sampling:
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise BadRequest("at most 4 stop strings", param="stop")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(
            max_tokens=self.max_tokens or default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields, CacheFields):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": "Summarise the contract."}],
                    "max_tokens": 64,
                    "cache_id": "cache_0123456789abcdef01234567",
                }
            ]
        },
    )
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_OUTPUT_TOKENS)
    logprobs: bool | None = Field(None, description="Not supported; must be false or absent.")

    def chat_sampling(self) -> Sampling:
        if self.logprobs:
            raise BadRequest(
                "logprobs are not supported here; use /v1/cache/attach", param="logprobs"
            )
        s = self.sampling()
        if self.max_tokens is None and self.max_completion_tokens is not None:
            s = Sampling(
                max_tokens=self.max_completion_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
                seed=s.seed,
                stop=s.stop,
            )
        return s


class CompletionRequest(SamplingFields, CacheFields):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [{"model": "tiny", "prompt": "def main():", "max_tokens": 32}]
        },
    )
    prompt: (
        Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
        | Annotated[list[int], Field(min_length=1, max_length=MAX_TOKEN_IDS)]
    ) = Field(description="Text, or token ids of the served model.")
    logprobs: int | None = Field(None, ge=0, le=5, description="Not supported; must be absent.")
    echo: bool = Field(False, description="Not supported; must be false.")

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.logprobs is not None:
            raise ValueError("logprobs are not supported here; use /v1/cache/attach")
        if self.echo:
            raise ValueError("echo is not supported")
        return self


# --- responses ----------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose KV was reused, not computed.")


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CacheInfo(BaseModel):
    id: str
    hit: bool
    miss_reason: Literal["too_short", "evicted", "load_failed"] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    cache: CacheInfo | None = Field(None, description="The attached cache, when one was.")
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage
    cache: CacheInfo | None = Field(None, description="The attached cache, when one was.")
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvaas"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- running a request ---------------------------------------------------------------------------
def get_cache_service(request: Request) -> CacheService:
    return request.app.state.cache_service


Service = Annotated[CacheService, Depends(get_cache_service)]
CacheHeader = Annotated[
    str | None,
    Header(
        alias=CACHE_HEADER,
        max_length=64,
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="Cache id (`cache_…`) or tag to attach; the body's fields take precedence.",
    ),
]


class Run:
    """One request's generation with or without a cache, and its counts."""

    def __init__(self, prompt_tokens: int, outcome: AttachOutcome | None) -> None:
        self.outcome = outcome
        self.generation = outcome.generation if outcome else Generation()
        self._prompt_tokens = prompt_tokens

    @property
    def prompt_tokens(self) -> int:
        return self.outcome.prompt_tokens if self.outcome else self._prompt_tokens

    def usage(self) -> CompletionUsage:
        g = self.generation
        cached = self.outcome.cached_tokens if self.outcome else g.cached_tokens
        out = len(g.token_ids)
        return CompletionUsage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=out,
            total_tokens=self.prompt_tokens + out,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    def cache_info(self) -> CacheInfo | None:
        o = self.outcome
        if o is None:
            return None
        return CacheInfo(id=o.cache.id, hit=o.hit, miss_reason=o.miss_reason)  # type: ignore[arg-type]


def _cache_ref(body: CacheFields, header_value: str | None) -> tuple[str | None, str | None]:
    """``(cache_id, tag)`` to attach, from the body or else the ``X-KVaaS-Cache`` header."""
    if body.cache_id is not None and body.cache_tag is not None:
        raise BadRequest("give `cache_id` or `cache_tag`, not both", param="cache_id")
    if body.cache_id is not None or body.cache_tag is not None:
        return body.cache_id, body.cache_tag
    if header_value:
        value = header_value.strip()
        return (value, None) if CACHE_ID_RE.match(value) else (None, value)
    return None, None


async def _plain_ids(service: CacheService, prompt: Prompt, sampling: Sampling) -> list[int]:
    """Token ids of a request without a cache, checked against the model's limits."""
    policy = service.prompts
    ids = await policy.tokenize(
        prompt, continuation=False, generation_prompt=True, ids_param="prompt"
    )
    policy.require_tokens(ids, param="prompt")
    policy.check_generation(len(ids), sampling.max_tokens, f"prompt ({len(ids)})")
    return ids


async def _generate(
    service: CacheService,
    session: AsyncSession,
    tenant: Tenant,
    ref: tuple[str | None, str | None],
    prompt: Prompt,
    sampling: Sampling,
    require_hit: bool,
    version: int | None,
) -> Run:
    engine = service.prompts.engine
    cache_id, tag = ref
    if cache_id is None and tag is None:
        ids = await _plain_ids(service, prompt, sampling)
        sampling = service.salted(tenant, sampling)
        try:
            gen = await engine.generate(ids, sampling)
        except EngineError as e:
            raise ServiceUnavailable(f"the engine failed: {e}") from e
        run = Run(len(ids), None)
        run.generation = gen
        return run
    outcome = await service.attach(
        session,
        tenant,
        cache_id,
        prompt,
        sampling,
        require_hit=require_hit,
        tag=tag,
        version=version,
    )
    return Run(outcome.prompt_tokens, outcome)


async def _generate_stream(
    service: CacheService,
    session: AsyncSession,
    tenant: Tenant,
    ref: tuple[str | None, str | None],
    prompt: Prompt,
    sampling: Sampling,
    require_hit: bool,
    version: int | None,
) -> tuple[Run, AsyncIterator[Generation]]:
    engine = service.prompts.engine
    cache_id, tag = ref
    if cache_id is None and tag is None:
        ids = await _plain_ids(service, prompt, sampling)
        sampling = service.salted(tenant, sampling)
        run = Run(len(ids), None)

        async def deltas() -> AsyncIterator[Generation]:
            async for d in engine.stream(ids, sampling):
                run.generation.absorb(d)
                yield d

        return run, deltas()
    outcome, stream = await service.attach_stream(
        session,
        tenant,
        cache_id,
        prompt,
        sampling,
        require_hit=require_hit,
        tag=tag,
        version=version,
    )
    return Run(outcome.prompt_tokens, outcome), stream


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
                info = run.cache_info()
                chunk["cache"] = info.model_dump() if info else None
            yield _sse(chunk)
        if include_usage:
            yield _sse({**head(), "choices": [], "usage": run.usage().model_dump()})
    except Exception as e:  # the status line is gone: report in-band
        yield _sse({"error": {"type": "internal_error", "message": f"generation failed: {e}"}})
    yield b"data: [DONE]\n\n"


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


COMPLETION_ERRORS = error_responses(
    BadRequest, AuthenticationError, PermissionDenied, NotFound, CacheMiss, EngineUnavailable
)
STREAM_200 = {
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
    service: Service,
    x_kvaas_cache: CacheHeader = None,
) -> ChatCompletion:
    engine = service.prompts.engine
    service.prompts.check_model(body.model, NotFound)
    sampling = body.chat_sampling()
    prompt = Prompt(messages=[m.as_dict() for m in body.messages])
    ref = _cache_ref(body, x_kvaas_cache)
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), engine.model.name
    if body.stream:
        run, deltas = await _generate_stream(
            service,
            session,
            auth.tenant,
            ref,
            prompt,
            sampling,
            body.require_hit,
            body.cache_version,
        )

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
    run = await _generate(
        service, session, auth.tenant, ref, prompt, sampling, body.require_hit, body.cache_version
    )
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
        usage=run.usage(),
        cache=run.cache_info(),
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
    service: Service,
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
        run, deltas = await _generate_stream(
            service,
            session,
            auth.tenant,
            ref,
            prompt,
            sampling,
            body.require_hit,
            body.cache_version,
        )

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
    run = await _generate(
        service, session, auth.tenant, ref, prompt, sampling, body.require_hit, body.cache_version
    )
    g = run.generation
    return Completion(
        id=rid,
        created=created,
        model=model,
        choices=[CompletionChoice(text=g.text, finish_reason=_finish(g.finish_reason))],
        usage=run.usage(),
        cache=run.cache_info(),
    )


@router.get(
    "/models",
    summary="List the served models (OpenAI-compatible)",
    responses=error_responses(AuthenticationError, PermissionDenied),
)
async def list_models(auth: Auth, service: Service) -> ModelList:
    """The model this gateway's engine serves (an empty list without an engine)."""
    if service.engine is None:
        return ModelList(data=[])
    return ModelList(data=[ModelCard(id=service.engine.model.name, created=0)])
