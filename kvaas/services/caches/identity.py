"""Cache identity and prefill plans: a prompt's token ids as stored bytes and hash, its chunk
keys in the tenant's namespace (model, scheme and chunk size included), and :class:`PrefillJob`,
one version to prefill with the manifest and transfer plan it writes."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import blake3
import numpy as np

from kvaas import codec
from kvaas.connector.params import TransferPlan
from kvaas.store.crypto import TenantKeys
from kvaas.store.keys import ChunkKey, chunk_keys, namespace_slot, partial_tokens, shard_keys
from kvaas.store.manifest import Manifest


@dataclass
class PrefillJob:
    """One version to prefill and store: its tokens, keys and where they go. It holds plain
    values only (the tenant's namespace, not its row): a background prefill outlives the
    request's session."""

    namespace: bytes
    cache_id: str
    version: int
    ids: list[int]
    keys: list[ChunkKey]
    skip: int  # leading chunks already stored (the parent version's), loaded not computed
    chunk_tokens: int
    scheme: str
    storage_class: str
    fingerprint: str
    seal: TenantKeys  # the tenant's chunk encryption keys, for the plan
    #: the engine's tensor- and pipeline-parallel sizes: each rank stores its piece of a chunk
    #: under its own shard key (:func:`kvaas.store.keys.shard_keys`)
    world: tuple[int, int] = (1, 1)

    @property
    def salt(self) -> str:
        return engine_salt(self.namespace)

    @property
    def slot(self) -> str:
        return namespace_slot(self.namespace)

    @property
    def stored_keys(self) -> list[ChunkKey]:
        """The keys the store holds this version's chunks under: :attr:`keys` with a world of
        one, else every rank's shard key of each, chunk major. Every store operation (the
        manifest, sizes, releases) names these; the plan names :attr:`keys` (each rank of the
        engine derives its own shard keys)."""
        return shard_keys(self.keys, *self.world)

    def manifest(self) -> Manifest:
        return Manifest(
            cache_id=self.cache_id,
            version=self.version,
            namespace_slot=self.slot,
            chunk_keys=tuple(self.stored_keys),
            shards=self.world[0] * self.world[1],
            token_count=len(self.ids),
            chunk_tokens=self.chunk_tokens,
            scheme=self.scheme,
            model_fingerprint=self.fingerprint,
            storage_class=self.storage_class,  # type: ignore[arg-type]
        )

    @property
    def tail(self) -> int:
        """Tokens of the version's partial last chunk (0: every chunk is full)."""
        return partial_tokens(len(self.ids), self.chunk_tokens, len(self.keys))

    def plan(self) -> TransferPlan:
        return TransferPlan(
            "save",
            tuple(self.keys),
            self.chunk_tokens,
            self.scheme,
            self.storage_class,
            skip=self.skip,
            fingerprint=self.fingerprint,
            seal=self.seal,
            tail=self.tail,
        )


#: Derivation context of the engine's prefix-cache salt: a key of its own, unrelated to the
#: chunk keys and to the (short, public) slot prefix.
_SALT_CONTEXT = "kvaas 2026-11 engine prefix-cache salt v1"


def engine_salt(namespace: bytes) -> str:
    """The tenant's ``cache_salt`` for the engine's own prefix cache: 32 bytes (hex) derived
    from its namespace, so no two tenants share (or can time) the engine's cached KV."""
    return blake3.blake3(namespace, derive_key_context=_SALT_CONTEXT).hexdigest()


def tokens_to_bytes(ids: Sequence[int]) -> bytes:
    return np.asarray(ids, dtype="<i4").tobytes()


def bytes_to_tokens(raw: bytes) -> list[int]:
    return np.frombuffer(raw, dtype="<i4").tolist()


def prefix_sha256(ids: Sequence[int]) -> str:
    return hashlib.sha256(tokens_to_bytes(ids)).hexdigest()


def keys_for(
    namespace: bytes,
    ids: Sequence[int],
    scheme: str,
    fingerprint: str,
    chunk_tokens: int,
    chunks: int | None = None,
) -> list[ChunkKey]:
    """The chunk keys of ``ids`` as a version stored as ``chunks`` chunks names them: its
    partial last chunk's too when ``chunks`` counts one (a version stored before partial chunks
    were counts only full ones). ``None``: as a new version is stored
    (:func:`~kvaas.store.keys.stored_chunks`)."""
    partial = chunks is None or partial_tokens(len(ids), chunk_tokens, chunks) > 0
    return chunk_keys(
        ids,
        namespace=namespace,
        model_fingerprint=fingerprint,
        scheme_id=f"{scheme}:{codec.scheme_id(scheme)}",
        chunk_tokens=chunk_tokens,
        partial=partial,
    )
