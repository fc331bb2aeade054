"""Chunk identity: determinism across processes, chaining, tenant separation, prefixes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from kvaas.store import (
    KEY_BYTES,
    Manifest,
    MemoryTier,
    chunk_keys,
    derive_namespace,
    key_from_hex,
    key_slot,
    longest_stored_prefix,
    namespace_slot,
    partial_tokens,
    stored_chunks,
    trailing_tokens,
    validate_chunk_tokens,
)

SECRET = b"tenant-secret-0123456789abcdef"
TOKENS = list(range(1000, 1000 + 4 * 256 + 17))


def keys_of(tokens: object, secret: bytes = SECRET, **kw: object) -> list[bytes]:
    args: dict[str, object] = {"model_fingerprint": "m1", "scheme_id": "int4"}
    args.update(kw)
    return chunk_keys(tokens, namespace=derive_namespace(secret), **args)  # type: ignore[arg-type]


def test_keys_are_deterministic_across_processes() -> None:
    mine = [k.hex() for k in keys_of(TOKENS)]
    code = (
        "from kvaas.store.keys import chunk_keys, derive_namespace\n"
        f"ks = chunk_keys({TOKENS!r}, namespace=derive_namespace({SECRET!r}), "
        "model_fingerprint='m1', scheme_id='int4')\n"
        "print(','.join(k.hex() for k in ks))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip().split(",") == mine
    assert len(mine) == 4 and all(len(bytes.fromhex(h)) == KEY_BYTES for h in mine)
    # pinned: the scheme names stored data, so it must never change silently
    assert mine[0] == "45edf73d23076b937a67b098c0d8b4bf0cb6a846b82c9f8c68b2e996b9a09a3f"


def test_only_full_chunks_get_keys_and_inputs_are_equivalent() -> None:
    ks = keys_of(TOKENS)
    assert len(ks) == len(TOKENS) // 256
    assert trailing_tokens(len(TOKENS), 256) == 17
    assert keys_of(np.array(TOKENS, dtype=np.int64)) == ks
    assert keys_of(TOKENS[: 3 * 256]) == ks[:3]  # a prefix of tokens → a prefix of keys
    assert keys_of(TOKENS[:255]) == []


def test_each_key_names_its_whole_prefix() -> None:
    a = keys_of(TOKENS)
    changed = list(TOKENS)
    changed[5] += 1  # change a token of the first chunk only
    b = keys_of(changed)
    assert all(x != y for x, y in zip(a, b, strict=True))  # every later key changes too


@pytest.mark.parametrize(
    "change",
    [{"model_fingerprint": "m2"}, {"scheme_id": "int8"}, {"chunk_tokens": 128}],
)
def test_model_codec_and_chunking_change_keys(change: dict[str, object]) -> None:
    assert set(keys_of(TOKENS)).isdisjoint(keys_of(TOKENS, **change))


def test_tenants_are_separated() -> None:
    other = b"another-tenant-secret-0123456789"
    a, b = keys_of(TOKENS), keys_of(TOKENS, secret=other)
    assert set(a).isdisjoint(b)
    ns_a, ns_b = derive_namespace(SECRET), derive_namespace(other)
    assert namespace_slot(ns_a) != namespace_slot(ns_b)
    # every key of a tenant carries its slot (one Redis Cluster slot), which is not the namespace
    assert {key_slot(k) for k in a} == {namespace_slot(ns_a)}
    assert bytes.fromhex(namespace_slot(ns_a)) not in ns_a
    with pytest.raises(ValueError):
        derive_namespace(b"short")


def test_validation() -> None:
    with pytest.raises(ValueError):
        validate_chunk_tokens(100, block_size=16)
    assert validate_chunk_tokens(256, block_size=16) == 256
    with pytest.raises(ValueError):
        keys_of([-1] * 256)
    with pytest.raises(ValueError):
        keys_of([[1, 2]])
    with pytest.raises(ValueError):
        key_from_hex("abcd")
    k = keys_of(TOKENS)[0]
    assert key_from_hex(k.hex()) == k


async def test_longest_stored_prefix(blob: object) -> None:
    tier = MemoryTier(1 << 20)
    ks = keys_of(TOKENS)
    await tier.put_many([(ks[0], b"a"), (ks[1], b"b"), (ks[3], b"d")])
    assert await longest_stored_prefix(tier, ks) == 2
    assert await longest_stored_prefix(tier, []) == 0
    assert await longest_stored_prefix(tier, ks[2:]) == 0


def test_a_partial_last_chunk_gets_a_key_of_its_own_when_asked() -> None:
    """``partial=True`` adds one key for the trailing tokens, chained to the last full chunk's
    key; the full chunks' keys do not change, a prompt ending on a chunk boundary gets none,
    and the key depends on every trailing token (and on how many there are)."""
    full = keys_of(TOKENS)
    with_tail = keys_of(TOKENS, partial=True)
    assert with_tail[:-1] == full and len(with_tail) == len(full) + 1
    assert keys_of(TOKENS[: 4 * 256], partial=True) == full
    assert keys_of(TOKENS[:17], partial=True) != []  # a prompt shorter than one chunk
    changed = list(TOKENS)
    changed[-1] += 1
    assert keys_of(changed, partial=True)[:-1] == full
    assert keys_of(changed, partial=True)[-1] != with_tail[-1]
    assert keys_of(TOKENS[:-1], partial=True)[-1] != with_tail[-1]
    # a longer prompt with the same leading tokens names a full chunk there, not the tail
    assert keys_of(TOKENS + list(range(239)))[4] != with_tail[4]


def test_the_stored_chunk_count_rule_and_the_partial_chunk_it_implies() -> None:
    assert stored_chunks(1041, 256) == 5 and stored_chunks(1024, 256) == 4
    assert partial_tokens(1041, 256, 5) == 17  # stored with its partial chunk
    assert partial_tokens(1041, 256, 4) == 0  # full chunks only (stored before the rule)
    assert partial_tokens(1024, 256, 4) == 0


def test_a_manifest_names_a_partial_last_chunk_and_no_more() -> None:
    """A manifest's keys may name one chunk past the full ones (the partial last chunk); its
    stored tokens are then the version's own count, and a key past that is refused."""
    ns = derive_namespace(SECRET)
    keys = keys_of(TOKENS, partial=True)

    def manifest(n: int) -> Manifest:
        return Manifest(
            cache_id="c1",
            version=1,
            namespace_slot=namespace_slot(ns),
            chunk_keys=tuple(keys[:n]),
            token_count=len(TOKENS),
            chunk_tokens=256,
            scheme="int4",
            model_fingerprint="m1",
        )

    assert manifest(5).stored_tokens == len(TOKENS)
    assert manifest(4).stored_tokens == 4 * 256  # written before partial chunks were stored
    whole = manifest(5)
    assert Manifest.from_json(whole.to_json()) == whole
    with pytest.raises(ValueError, match="cannot fill 6 chunks"):
        Manifest(**{**_fields(manifest(5)), "chunk_keys": (*keys, keys[0])})


def _fields(m: Manifest) -> dict[str, object]:
    return {f: getattr(m, f) for f in m.__dataclass_fields__}
