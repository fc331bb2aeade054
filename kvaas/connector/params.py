"""What a request tells the KVaaS connector: the ``kv_transfer_params["kvaas"]`` document.

The gateway computes everything tenant-specific (chunk keys, codec, storage class, the
tenant's chunk encryption keys) and passes it with the request; the connector needs no tenant
state of its own::

    {"kvaas": {"op": "save" | "load",
               "keys": ["<64 hex>", ...],      # chunk keys, in prompt order, full chunks only
               "chunk_tokens": 256,
               "scheme": "int4",
               "fingerprint": "<model fingerprint>",
               "seal": {"key_id": "k1", "keys": {"k1": "<64 hex>", ...}},
               "tail": 160,                    # tokens of the last key's partial chunk
               "storage_class": "standard",    # save only
               "skip": 0,                      # save only
               "checked": true}}               # load only

``seal`` carries the tenant's data keys (:class:`~kvaas.store.crypto.TenantKeys`: derived by the
gateway from its master keys, never the master keys themselves); chunks are sealed under
``key_id`` and bound to their key, ``fingerprint`` and ``scheme``, so a load plan names the
scheme and fingerprint the chunks were saved with. A plan without ``seal`` cannot read or write
an encrypted store: its loads miss (vLLM recomputes) and its saves fail.

``tail`` (default 0): when above 0, the last key names a partial chunk of ``tail`` tokens
(``0 < tail < chunk_tokens``), the prompt's trailing tokens after its full chunks; every other
key names ``chunk_tokens`` tokens. ``save`` stores the KV of the prompt's first
:attr:`TransferPlan.tokens` tokens; ``load`` loads the longest stored prefix of ``keys`` (the
prompt must start with the tokens they name), the partial chunk only when every chunk before
it is stored too.

``skip`` (save only) says that the first ``skip`` chunks are stored already (a cache version
being extended): they are loaded like a ``load`` plan's, not computed, and only the chunks
after them are encoded and written.

``checked`` (load only, default false) says that whoever built the plan found every key of it
stored, every rank's piece included, just before sending it: the gateway does so for every
attach, and names only the keys it found. The scheduler then counts them as matched without
asking the store again (the lookup would repeat the gateway's, a round trip per shared tier on
the request's path). A chunk that goes in between is not found by the worker: the load
reports its blocks as failed and vLLM recomputes them, as for a corrupt chunk. Never wrong KV:
a stored chunk is checked against its key, fingerprint and scheme when it is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from kvaas.store.crypto import TenantKeys
from kvaas.store.keys import KEY_BYTES, ChunkKey

PARAMS_KEY = "kvaas"
MAX_KEYS = 4096


@dataclass(frozen=True, slots=True)
class TransferPlan:
    """One request's instructions to the connector."""

    op: Literal["save", "load"]
    keys: tuple[ChunkKey, ...]
    chunk_tokens: int
    scheme: str = "int4"
    storage_class: str = "standard"
    skip: int = 0
    fingerprint: str = ""
    seal: TenantKeys | None = None
    tail: int = 0
    checked: bool = False

    @property
    def tokens(self) -> int:
        """Tokens the plan's keys name."""
        return self.tokens_in(len(self.keys))

    def tokens_in(self, chunks: int) -> int:
        """Tokens the plan's first ``chunks`` keys name (the partial chunk's ``tail`` when
        they include it)."""
        chunks = min(chunks, len(self.keys))
        if self.tail and chunks == len(self.keys):
            return (chunks - 1) * self.chunk_tokens + self.tail
        return chunks * self.chunk_tokens

    def leading(self, chunks: int) -> TransferPlan:
        """The same plan for its first ``chunks`` keys only (the partial chunk's ``tail`` kept
        when they include it)."""
        chunks = min(chunks, len(self.keys))
        tail = self.tail if chunks == len(self.keys) else 0
        return replace(self, keys=self.keys[:chunks], tail=tail)

    def chunks_within(self, tokens: int) -> int:
        """How many of the plan's leading chunks the first ``tokens`` tokens complete."""
        full = min(len(self.keys), tokens // self.chunk_tokens)
        if self.tail and full == len(self.keys) - 1 and tokens >= self.tokens:
            return len(self.keys)
        return full

    def to_params(self) -> dict[str, Any]:
        """The ``kv_transfer_params`` dictionary carrying this plan."""
        doc: dict[str, Any] = {
            "op": self.op,
            "keys": [k.hex() for k in self.keys],
            "chunk_tokens": self.chunk_tokens,
            "scheme": self.scheme,
            "fingerprint": self.fingerprint,
            "storage_class": self.storage_class,
            "skip": self.skip,
            "tail": self.tail,
        }
        if self.checked:
            doc["checked"] = True
        if self.seal is not None:
            doc["seal"] = self.seal.to_doc()
        return {PARAMS_KEY: doc}

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> TransferPlan | None:
        """Parse a request's ``kv_transfer_params``; ``None`` when it carries no KVaaS plan.

        Raises ``ValueError`` on a malformed plan (the connector then ignores the request's
        plan: a bad plan may cost a recompute, never wrong KV).
        """
        if not params or PARAMS_KEY not in params:
            return None
        doc = params[PARAMS_KEY]
        if not isinstance(doc, Mapping):
            raise ValueError("kv_transfer_params.kvaas must be an object")
        op = doc.get("op")
        if op not in ("save", "load"):
            raise ValueError(f"kvaas.op must be 'save' or 'load', got {op!r}")
        raw = doc.get("keys")
        if not isinstance(raw, Sequence) or isinstance(raw, str) or len(raw) > MAX_KEYS:
            raise ValueError(f"kvaas.keys must be a list of at most {MAX_KEYS} hex keys")
        keys = []
        for h in raw:
            b = bytes.fromhex(h) if isinstance(h, str) else b""
            if len(b) != KEY_BYTES:
                raise ValueError("every kvaas key is 64 hex digits")
            keys.append(ChunkKey(b))
        chunk_tokens = doc.get("chunk_tokens")
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError("kvaas.chunk_tokens must be a positive integer")
        skip = doc.get("skip", 0)
        if isinstance(skip, bool) or not isinstance(skip, int) or not 0 <= skip <= len(keys):
            raise ValueError("kvaas.skip must be an integer in [0, len(keys)]")
        tail = doc.get("tail", 0)
        if (
            isinstance(tail, bool)
            or not isinstance(tail, int)
            or not 0 <= tail < chunk_tokens
            or (tail and not keys)
        ):
            raise ValueError("kvaas.tail must be an integer in [0, chunk_tokens), 0 without keys")
        checked = doc.get("checked", False)
        if not isinstance(checked, bool):
            raise ValueError("kvaas.checked must be true or false")
        seal = doc.get("seal")
        return cls(
            op=op,
            keys=tuple(keys),
            chunk_tokens=chunk_tokens,
            scheme=str(doc.get("scheme", "int4")),
            storage_class=str(doc.get("storage_class", "standard")),
            skip=skip if op == "save" else 0,
            fingerprint=str(doc.get("fingerprint", "")),
            seal=TenantKeys.from_doc(seal) if seal is not None else None,
            tail=tail,
            checked=checked and op == "load",
        )
