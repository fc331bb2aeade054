"""Bodies of ``/v1/cache/create`` and ``/v1/cache/attach``, and the cache object every cache
route answers with."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from kvaas.api.schemas.bounds import INT32_MAX, TokenId
from kvaas.db.models import Cache
from kvaas.engine import Sampling
from kvaas.services.caches import AttachOutcome, Progress, Prompt
from kvaas.store.keys import tokens_in_chunks

StorageClass = Literal["hot", "standard", "cold"]
Compression = Literal["none", "lossless", "int8", "int4"]
MAX_PROMPT_CHARS = 1_000_000
MAX_TOKEN_IDS = 131_072
TAG_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
#: C0 and C1 control characters and DEL: refused in names, ids and metadata (the databases
#: disagree about some of them, e.g. PostgreSQL cannot store NUL in text)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_METADATA_PAIRS = 16


def _no_control(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters (NUL, tabs, line breaks, ...)")
    return value


_printable = AfterValidator(_no_control)
#: Texts a tenant names things with: bounded, printable characters only.
CacheName = Annotated[str, Field(max_length=128), _printable]
CacheIdText = Annotated[str, Field(max_length=64), _printable]
MetadataKey = Annotated[str, Field(min_length=1, max_length=64), _printable]
MetadataValue = Annotated[str, Field(max_length=512), _printable]
#: At most 16 pairs, keys of 1-64 and values of at most 512 printable characters (so at most
#: 9,216 characters in all).
Metadata = dict[MetadataKey, MetadataValue]
METADATA_DESCRIPTION = (
    f"Up to {MAX_METADATA_PAIRS} string key/value pairs: keys of 1 to 64 characters, values of "
    "at most 512, no control characters."
)


class ChatMessage(BaseModel):
    # Two request schemas are called ChatMessage; the OpenAPI document tells them apart by
    # this module path (``kvaas__api__caches__ChatMessage``), which is kept stable.
    __module__ = "kvaas.api.caches"
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


ChatMessage.model_rebuild()  # resolve its annotations here, not in the module named above


class PromptFields(BaseModel):
    """The three forms of a prompt: ``prompt``, ``messages``, ``token_ids``."""

    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="Plain text.")
    messages: list[ChatMessage] | None = Field(
        None, max_length=1024, description="Chat messages, rendered with the model's template."
    )
    token_ids: list[TokenId] | None = Field(
        None, max_length=MAX_TOKEN_IDS, description="Token ids of the served model."
    )

    def to_prompt(self) -> Prompt:
        return Prompt(
            prompt=self.prompt,
            messages=[m.model_dump() for m in self.messages] if self.messages is not None else None,
            token_ids=self.token_ids,
        )

    def prompt_forms(self) -> int:
        """How many of the three forms are given."""
        return sum(x is not None for x in (self.prompt, self.messages, self.token_ids))


class OnePromptFields(PromptFields):
    """:class:`PromptFields` of which a request gives exactly one."""

    @model_validator(mode="after")
    def _one_prompt(self) -> OnePromptFields:
        if self.prompt_forms() != 1:
            raise ValueError("give exactly one of `prompt`, `messages` or `token_ids`")
        return self


class CreateCacheRequest(OnePromptFields):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "You are a helpful assistant. <long document>", "ttl_seconds": 3600}
            ]
        },
    )
    model: str | None = Field(None, max_length=128, description="Must name the served model.")
    name: CacheName | None = Field(None, description="A label of your choice.")
    ttl_seconds: int | None = Field(
        None, le=INT32_MAX, description="Lifetime in seconds (bounds: KVAAS_MIN/MAX_TTL_SECONDS)."
    )
    storage_class: StorageClass | None = Field(None, description="Where the KV is kept.")
    compression: Compression | None = Field(None, description="Codec of the stored KV.")
    metadata: Metadata = Field(
        default_factory=dict, max_length=MAX_METADATA_PAIRS, description=METADATA_DESCRIPTION
    )
    refresh_on_hit: bool = Field(
        False, description="Each attach pushes `expires_at` to now + the cache's TTL."
    )
    wait: bool = Field(
        True,
        description="`true`: answer `201` once the KV is stored. `false`: answer `202` with "
        "the `pending` cache at once and prefill in the background (poll `GET /v1/caches/{id}`).",
    )


class CacheUsage(BaseModel):
    prefill_tokens: int
    ttft_ms: float | None


class CacheProgress(BaseModel):
    tokens_done: int = Field(description="Tokens whose KV is stored.")
    tokens_total: int


class CacheObject(BaseModel):
    id: str
    object: Literal["cache"] = "cache"
    status: str
    name: str | None
    model: str
    version: int
    tokens: int = Field(description="Tokens of the cached prefix.")
    stored_tokens: int = Field(description="Tokens whose KV is stored.")
    stored_bytes: int
    compression: str
    storage_class: str
    prefix_sha256: str = Field(description="sha256 of the prefix's token ids (int32 LE).")
    metadata: dict[str, str]
    tags: list[str] = Field(default_factory=list, description="Tags pointing at this cache.")
    hit_count: int
    ttl_seconds: int = Field(description="Lifetime granted by the last TTL change.")
    refresh_on_hit: bool = Field(description="Each attach pushes `expires_at` to now + TTL.")
    last_used_at: datetime | None
    expires_at: datetime
    created_at: datetime
    failure_reason: str | None = None
    progress: CacheProgress | None = Field(
        None, description="Prefill progress (`pending` and `ready` caches)."
    )
    usage: CacheUsage | None = None

    @classmethod
    def of(
        cls,
        c: Cache,
        usage: CacheUsage | None = None,
        *,
        tags: list[str] | None = None,
        progress: Progress | None = None,
    ) -> CacheObject:
        return cls(
            id=c.id,
            status=c.status,
            name=c.name,
            model=c.model,
            version=c.version,
            tokens=c.tokens,
            stored_tokens=tokens_in_chunks(c.tokens, c.chunk_tokens, c.stored_chunks),
            stored_bytes=c.stored_bytes,
            compression=c.scheme,
            storage_class=c.storage_class,
            prefix_sha256=c.prefix_sha256,
            metadata=dict(c.meta),
            tags=list(tags or ()),
            hit_count=c.hit_count,
            ttl_seconds=c.ttl_seconds,
            refresh_on_hit=c.refresh_on_hit,
            last_used_at=c.last_used_at,
            expires_at=c.expires_at,
            created_at=c.created_at,
            failure_reason=c.failure_reason,
            progress=CacheProgress(
                tokens_done=progress.tokens_done, tokens_total=progress.tokens_total
            )
            if progress is not None
            else None,
            usage=usage,
        )


class AttachRequest(PromptFields):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "cache_id": "cache_0123456789abcdef01234567",
                    "prompt": "Q: ...",
                    "max_tokens": 64,
                },
                {"tag": "contract-latest", "version": 2, "prompt": "Q: ..."},
            ]
        },
    )
    cache_id: CacheIdText | None = Field(None, description="The cache (or give `tag`).")
    tag: str | None = Field(None, pattern=TAG_PATTERN, description="A tag naming the cache.")
    version: int | None = Field(
        None, ge=1, le=INT32_MAX, description="Version to attach (default: latest)."
    )
    max_tokens: int = Field(16, ge=1, le=8192)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Top log-probabilities per token.")
    stream: bool = Field(False, description="Stream tokens as server-sent events.")
    require_hit: bool = Field(False, description="Answer 409 instead of recomputing on a miss.")

    @model_validator(mode="after")
    def _at_most_one_prompt(self) -> AttachRequest:
        if (self.cache_id is None) == (self.tag is None):
            raise ValueError("give exactly one of `cache_id` or `tag`")
        if self.prompt_forms() > 1:
            raise ValueError("give at most one of `prompt`, `messages` or `token_ids`")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("at most 4 stop strings")
        return self

    def sampling(self) -> Sampling:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop,
            logprobs=self.logprobs,
        )


class AttachUsage(BaseModel):
    prompt_tokens: int = Field(description="Cache tokens + request tokens.")
    cached_tokens: int = Field(description="Prompt tokens whose KV was reused, not computed.")
    prefill_tokens: int = Field(description="Prompt tokens computed by this request.")
    output_tokens: int
    ttft_ms: float | None = Field(description="Time to first token inside the engine.")

    @classmethod
    def of(cls, o: AttachOutcome) -> AttachUsage:
        g = o.generation
        return cls(
            prompt_tokens=o.prompt_tokens,
            cached_tokens=o.cached_tokens,
            prefill_tokens=o.prompt_tokens - o.cached_tokens,
            output_tokens=len(g.token_ids),
            ttft_ms=round(g.ttft_ms, 3) if g.ttft_ms is not None else None,
        )


class AttachCacheInfo(BaseModel):
    id: str
    hit: bool
    miss_reason: Literal["too_short", "evicted", "load_failed"] | None = None

    @classmethod
    def of(cls, o: AttachOutcome) -> AttachCacheInfo:
        return cls(id=o.cache.id, hit=o.hit, miss_reason=o.miss_reason)


class Choice(BaseModel):
    index: int = 0
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[str, float]] | None = Field(
        None, description="Per generated token: top candidates, token id → log-probability."
    )


class AttachResponse(BaseModel):
    id: str
    object: Literal["cache.attach"] = "cache.attach"
    model: str
    choices: list[Choice]
    usage: AttachUsage
    cache: AttachCacheInfo
