"""Bodies of the OpenAI-compatible routes (``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``), shaped like OpenAI's."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvaas.api.schemas.bounds import INT32_MAX, TokenId
from kvaas.api.schemas.caches import TAG_PATTERN
from kvaas.engine import Sampling
from kvaas.errors import BadRequest

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
    # Two request schemas are called ChatMessage; the OpenAPI document tells them apart by
    # this module path (``kvaas__api__openai_compat__ChatMessage``), which is kept stable.
    __module__ = "kvaas.api.openai_compat"
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="Text, or a list of text parts.")
    name: str | None = Field(None, max_length=64)

    def as_dict(self) -> dict[str, str]:
        """The message as the prompt policy takes it (``developer`` speaks as ``system``)."""
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


ChatMessage.model_rebuild()  # resolve its annotations here, not in the module named above


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
        None,
        ge=1,
        le=INT32_MAX,
        description="Version of the cache to attach (default: the latest).",
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

    def sampling(self, max_tokens: int | None = None) -> Sampling:
        """The engine's sampling parameters, ``max_tokens`` (else 16) standing in for an absent
        ``max_tokens`` field; 400 for more than 4 stop strings."""
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise BadRequest("at most 4 stop strings", param="stop")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(
            max_tokens=self.max_tokens or max_tokens or 16,
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
        """:meth:`sampling`, with ``max_completion_tokens`` standing in for ``max_tokens``;
        400 when logprobs are asked for."""
        if self.logprobs:
            raise BadRequest(
                "logprobs are not supported here; use /v1/cache/attach", param="logprobs"
            )
        return self.sampling(self.max_completion_tokens)


class CompletionRequest(SamplingFields, CacheFields):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [{"model": "tiny", "prompt": "def main():", "max_tokens": 32}]
        },
    )
    prompt: (
        Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
        | Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TOKEN_IDS)]
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


class _CompletionAnswer(BaseModel):
    """The fields of a chat and a text completion; each names its ``object`` and its
    ``choices`` (their order stays this one)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[Any]
    usage: CompletionUsage
    cache: CacheInfo | None = Field(None, description="The attached cache, when one was.")
    system_fingerprint: str | None = None


class ChatCompletion(_CompletionAnswer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(_CompletionAnswer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvaas"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
