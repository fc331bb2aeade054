"""Building a :class:`~kvaas.store.tiered.TieredStore` from configuration.

:class:`StoreConfig` is a plain, JSON-able description of a store (``to_dict``/``from_dict``), so
the gateway can hand it to vLLM worker processes, which build their own store from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvaas.store.disk import DiskTier
from kvaas.store.errors import ConfigurationError
from kvaas.store.memory import MemoryTier
from kvaas.store.policy import EvictionPolicy, LRUPolicy, SizeAwarePolicy
from kvaas.store.redis_conn import RedisConnection, RedisKeys
from kvaas.store.redis_tier import RedisTier
from kvaas.store.refs import RefIndex
from kvaas.store.refs_redis import RedisRefIndex
from kvaas.store.refs_sqlite import SqliteRefIndex
from kvaas.store.tier import Tier
from kvaas.store.tiered import TieredStore

if TYPE_CHECKING:
    from kvaas.config import Settings

INDEX_FILE = "index.sqlite3"
_POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "size": SizeAwarePolicy}


@dataclass
class StoreConfig:
    """What tiers a store has and their budgets.

    - ``memory_bytes``: budget of the in-process memory tier (0: no memory tier).
    - ``disk_dir`` / ``disk_bytes``: the disk tier's directory and budget (``None``: no disk tier).
    - ``redis_url`` (``None``: no Redis tier), ``redis_cluster``, ``redis_ttl_s`` (idle expiry of
      chunks in Redis; ``None``: none), ``redis_prefix`` (key prefix).
    - ``index_path``: SQLite file of the reference index when there is no Redis (default
      ``<disk_dir>/index.sqlite3``). With Redis, the index lives in Redis.
    - ``max_chunk_bytes``: largest chunk blob accepted (``None``: only the tiers' budgets
      limit it); every bounded tier's budget must hold at least one such chunk.
    - ``eviction``: ``lru`` (default) or ``size`` (size-aware, GreedyDual-Size).
    - ``encrypted``: the store holds sealed chunks only (default; see
      :mod:`kvaas.store.crypto`). No key lives here: keys come with each read and write.
    """

    memory_bytes: int
    disk_dir: Path | None
    disk_bytes: int
    redis_url: str | None
    redis_cluster: bool = False
    redis_ttl_s: float | None = None
    redis_prefix: str = "kvaas"
    index_path: Path | None = None
    max_chunk_bytes: int | None = None
    eviction: str = "lru"
    encrypted: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> StoreConfig:
        """The store configuration of a service's settings (``KVAAS_*``); a zero disk budget
        disables the disk tier."""
        return cls(
            memory_bytes=settings.memory_tier_bytes,
            disk_dir=settings.resolved_disk_tier_dir if settings.disk_tier_bytes > 0 else None,
            disk_bytes=settings.disk_tier_bytes,
            redis_url=settings.redis_url,
            redis_cluster=settings.redis_cluster,
            redis_prefix=settings.redis_prefix,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (paths as strings) that :meth:`from_dict` reads back."""
        out = asdict(self)
        for name in ("disk_dir", "index_path"):
            if out[name] is not None:
                out[name] = str(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoreConfig:
        """Parse :meth:`to_dict` output; unknown keys raise :class:`ConfigurationError`."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigurationError(f"unknown store settings: {sorted(unknown)}")
        values = dict(data)
        for name in ("disk_dir", "index_path"):
            if values.get(name) is not None:
                values[name] = Path(values[name])
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigurationError(f"invalid store settings: {e}") from e

    def validate(self) -> None:
        """Raise :class:`ConfigurationError` with a clear message for impossible settings."""
        if self.memory_bytes < 0:
            raise ConfigurationError(f"memory tier budget must be >= 0, got {self.memory_bytes}")
        if self.disk_dir is not None and self.disk_bytes <= 0:
            raise ConfigurationError(
                f"disk tier at {self.disk_dir} needs a positive byte budget, got {self.disk_bytes}"
            )
        if self.memory_bytes == 0 and self.disk_dir is None and not self.redis_url:
            raise ConfigurationError(
                "the KV store needs at least one tier: set a memory budget, a disk directory or "
                "a Redis URL"
            )
        if self.redis_ttl_s is not None and self.redis_ttl_s <= 0:
            raise ConfigurationError(f"redis_ttl_s must be positive, got {self.redis_ttl_s}")
        if self.eviction not in _POLICIES:
            raise ConfigurationError(
                f"unknown eviction policy {self.eviction!r}; choose one of {sorted(_POLICIES)}"
            )
        RedisKeys(self.redis_prefix)  # raises on a bad prefix
        if self.max_chunk_bytes is not None:
            if self.max_chunk_bytes <= 0:
                raise ConfigurationError("max_chunk_bytes must be positive")
            budgets = {"memory": self.memory_bytes} if self.memory_bytes else {}
            if self.disk_dir is not None:
                budgets["disk"] = self.disk_bytes
            for tier, budget in budgets.items():
                if budget < self.max_chunk_bytes:
                    raise ConfigurationError(
                        f"the {tier} tier's budget ({budget} bytes) is smaller than one chunk "
                        f"(max_chunk_bytes={self.max_chunk_bytes})"
                    )


def build_store(cfg: StoreConfig) -> TieredStore:
    """A (not yet opened) :class:`TieredStore` for ``cfg``: tiers memory → Redis → disk as
    configured; the reference index in Redis when there is a Redis tier, else a SQLite file
    (``index_path``, default ``<disk_dir>/index.sqlite3``; a memory-only store keeps it in a
    private in-memory database). Raises :class:`ConfigurationError`."""
    cfg.validate()
    tiers: list[Tier] = []
    if cfg.memory_bytes > 0:
        tiers.append(MemoryTier(cfg.memory_bytes))
    refs: RefIndex
    if cfg.redis_url:
        conn = RedisConnection(cfg.redis_url, cluster=cfg.redis_cluster, prefix=cfg.redis_prefix)
        tiers.append(RedisTier(conn, ttl_s=cfg.redis_ttl_s))
        refs = RedisRefIndex(conn)
    if cfg.disk_dir is not None:
        tiers.append(DiskTier(cfg.disk_dir, cfg.disk_bytes))
    if not cfg.redis_url:
        if cfg.index_path is not None:
            path = cfg.index_path
        elif cfg.disk_dir is not None:
            path = cfg.disk_dir / INDEX_FILE
        else:
            path = Path(":memory:")
        refs = SqliteRefIndex(path)
    return TieredStore(
        tiers,
        refs,
        policy=_POLICIES[cfg.eviction](),
        max_chunk_bytes=cfg.max_chunk_bytes,
        encrypted=cfg.encrypted,
    )
