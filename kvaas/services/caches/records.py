"""What the cache service takes and returns: request specs, results, attach outcomes, the
errors it adds to the API's, and the messages it answers with."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from kvaas.db.models import Cache
from kvaas.engine import Generation
from kvaas.errors import Conflict
from kvaas.services.prompts import Prompt


class CacheMiss(Conflict):
    type = "cache_miss"
    description = "The cache could not be attached and require_hit was set."


NOT_FOUND = "no cache with id {id!r} (it may have expired or been deleted)"
TAG_NOT_FOUND = "no tag {name!r} (or the cache it pointed at is gone)"
SHUTDOWN_REASON = "the gateway shut down before the prefill finished"
STALE_REASON = "the prefill did not finish (the gateway running it stopped)"
#: A prefill still pending after this long has lost its gateway; the sweep fails it.
STALE_PENDING = timedelta(hours=1)
#: What a retired (deleted, expired or failed) cache or version keeps of its prompt's token ids:
#: nothing. Its token count and ``prefix_sha256`` stay, for billing and audit.
PURGED = b""


@dataclass(frozen=True)
class CacheRef:
    """The cache a request attaches: by id or by tag (neither: none), which version (``None``:
    the latest), and whether a miss is refused (``409``) instead of recomputed."""

    cache_id: str | None = None
    tag: str | None = None
    version: int | None = None
    require_hit: bool = False

    @property
    def attached(self) -> bool:
        return self.cache_id is not None or self.tag is not None


@dataclass
class CreateSpec:
    prompt: Prompt
    name: str | None = None
    ttl_seconds: int | None = None
    storage_class: str | None = None
    scheme: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    refresh_on_hit: bool = False


@dataclass
class CreateResult:
    """A created cache (or new version). ``prefill_tokens`` / ``ttft_ms`` are those of the
    prefill; both unset while it still runs in the background."""

    cache: Cache
    prefill_tokens: int | None
    ttft_ms: float | None


UNSET: Any = object()


@dataclass
class CachePatch:
    """Fields a PATCH changes; a field left ``UNSET`` is not touched."""

    name: Any = UNSET
    metadata: Any = UNSET
    ttl_seconds: Any = UNSET
    expires_at: Any = UNSET
    storage_class: Any = UNSET
    refresh_on_hit: Any = UNSET


@dataclass(frozen=True)
class Progress:
    tokens_done: int
    tokens_total: int


@dataclass
class AttachOutcome:
    generation: Generation
    cache: Cache
    prompt_tokens: int
    expected_tokens: int
    available_tokens: int
    version: int = 0

    @property
    def load_failed(self) -> bool:
        return bool(self.generation.connector.get("load_failed"))

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose KV was reused (a failed load's recomputed tokens excluded)."""
        g = self.generation
        if self.load_failed:
            return min(g.cached_tokens, int(g.connector.get("loaded_tokens", 0)))
        return g.cached_tokens

    @property
    def hit(self) -> bool:
        return (
            self.expected_tokens > 0
            and not self.load_failed
            and self.cached_tokens >= self.expected_tokens
        )

    @property
    def miss_reason(self) -> str | None:
        if self.hit:
            return None
        if self.expected_tokens == 0:
            return "too_short"
        if self.available_tokens < self.expected_tokens:
            return "evicted"
        return "load_failed"
