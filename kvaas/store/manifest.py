"""Manifests: what a cache version is made of.

A :class:`Manifest` lists a cache version's ordered chunk keys and what is needed to use them
(token count, chunk size, scheme, model fingerprint, storage class). It is stored with the chunks
(in Redis when the store has a Redis tier, else in the SQLite index next to the disk tier) by a
:class:`~kvaas.store.refs.RefIndex`, which also keeps the per-chunk reference counts that let
versions share chunks. The JSON form is canonical (sorted keys, no spaces): storing the same
manifest twice is recognised as the same.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kvaas.store.keys import KEY_BYTES, SLOT_BYTES, ChunkKey, key_from_hex
from kvaas.store.policy import StorageClass, check_storage_class

_CACHE_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_SLOT = re.compile(r"^[0-9a-f]{%d}$" % (2 * SLOT_BYTES))  # noqa: UP031
FORMAT = 1


@dataclass(frozen=True, slots=True)
class Manifest:
    """One immutable cache version.

    ``chunk_keys`` cover the first ``len(chunk_keys) * chunk_tokens`` tokens; ``token_count`` is
    the version's full token count (a trailing partial chunk is not stored). Every key must carry
    ``namespace_slot`` (all chunks of a manifest belong to one tenant). ``bytes_per_tier`` is
    informational, as measured by the writer (see ``TieredStore.usage`` for current numbers).
    """

    cache_id: str
    version: int
    namespace_slot: str
    chunk_keys: tuple[ChunkKey, ...]
    token_count: int
    chunk_tokens: int
    scheme: str
    model_fingerprint: str
    storage_class: StorageClass = "standard"
    bytes_per_tier: Mapping[str, int] = field(default_factory=dict)
    created_at: float = field(default_factory=lambda: round(time.time(), 3))

    def __post_init__(self) -> None:
        if not _CACHE_ID.match(self.cache_id):
            raise ValueError(f"invalid cache id {self.cache_id!r} (1-128 of [A-Za-z0-9_.-])")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            raise ValueError(f"version must be a non-negative int, got {self.version!r}")
        if not _SLOT.match(self.namespace_slot):
            raise ValueError(f"invalid namespace slot {self.namespace_slot!r}")
        check_storage_class(self.storage_class)
        if self.chunk_tokens <= 0:
            raise ValueError("chunk_tokens must be positive")
        if self.token_count < len(self.chunk_keys) * self.chunk_tokens:
            raise ValueError(
                f"token_count {self.token_count} is below the {len(self.chunk_keys)} chunks' "
                f"{len(self.chunk_keys) * self.chunk_tokens} tokens"
            )
        slot = bytes.fromhex(self.namespace_slot)
        object.__setattr__(self, "chunk_keys", tuple(self.chunk_keys))
        for k in self.chunk_keys:
            if len(k) != KEY_BYTES or k[:SLOT_BYTES] != slot:
                raise ValueError("every chunk key must be 32 bytes and carry the namespace slot")
        object.__setattr__(self, "bytes_per_tier", dict(self.bytes_per_tier))

    def to_json(self) -> bytes:
        """Canonical JSON bytes (what is stored)."""
        doc: dict[str, Any] = {
            "format": FORMAT,
            "cache_id": self.cache_id,
            "version": self.version,
            "namespace_slot": self.namespace_slot,
            "chunk_keys": [k.hex() for k in self.chunk_keys],
            "token_count": self.token_count,
            "chunk_tokens": self.chunk_tokens,
            "scheme": self.scheme,
            "model_fingerprint": self.model_fingerprint,
            "storage_class": self.storage_class,
            "bytes_per_tier": dict(sorted(self.bytes_per_tier.items())),
            "created_at": self.created_at,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Manifest:
        """Parse :meth:`to_json` output; raises ``ValueError`` on anything else."""
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT:
                raise ValueError(f"unsupported manifest format {doc.get('format')!r}")
            return cls(
                cache_id=doc["cache_id"],
                version=doc["version"],
                namespace_slot=doc["namespace_slot"],
                chunk_keys=tuple(key_from_hex(h) for h in doc["chunk_keys"]),
                token_count=doc["token_count"],
                chunk_tokens=doc["chunk_tokens"],
                scheme=doc["scheme"],
                model_fingerprint=doc["model_fingerprint"],
                storage_class=doc["storage_class"],
                bytes_per_tier=doc["bytes_per_tier"],
                created_at=doc["created_at"],
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed manifest: {e}") from e

    def with_storage_class(self, storage_class: StorageClass) -> Manifest:
        return replace(self, storage_class=check_storage_class(storage_class))

    @property
    def stored_tokens(self) -> int:
        """Tokens covered by the stored chunks."""
        return len(self.chunk_keys) * self.chunk_tokens
