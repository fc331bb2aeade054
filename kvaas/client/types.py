"""The objects the API returns, as pydantic models that keep every field the server sends
(unknown ones too, as attributes)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


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
