"""/v1/cache/create and /v1/cache/attach on the real engine: correctness against a cold run,
every tier, misses, ownership, streaming; the gateway's checked plans, which the engine's
scheduler trusts instead of asking the store again."""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from kvaas.db.base import utcnow
from kvaas.db.models import Cache
from kvaas.engine import Sampling
from kvaas.services.caches.records import AttachOutcome, CacheRef
from kvaas.services.prompts import Prompt
from kvaas.store.keys import ChunkKey

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

TEXT_IDS: list[int] = []


def corpus_ids(gateway) -> list[int]:  # type: ignore[no-untyped-def]
    if not TEXT_IDS:
        text = Path(os.__file__).read_text() + Path(os.path.__file__).read_text()
        TEXT_IDS.extend(gateway.app.state.engine.model.encode(text))
    return TEXT_IDS


async def create(gateway, ids, **kw):  # type: ignore[no-untyped-def]
    r = await gateway.client.post(
        "/v1/cache/create", json={"token_ids": ids, **kw}, headers=gateway.auth()
    )
    assert r.status_code == 201, r.text
    return r.json()


async def attach(gateway, cache_id, extra, key=None, **kw):  # type: ignore[no-untyped-def]
    body = {"cache_id": cache_id, "max_tokens": 6, "temperature": 0.0, "logprobs": 5, **kw}
    if extra:
        body["token_ids"] = extra
    return await gateway.client.post("/v1/cache/attach", json=body, headers=gateway.auth(key))


async def cold(gateway, ids):  # type: ignore[no-untyped-def]
    return await gateway.app.state.engine.generate(
        ids, Sampling(max_tokens=6, temperature=0.0, logprobs=5)
    )


def assert_same(body, ref) -> None:  # type: ignore[no-untyped-def]
    choice = body["choices"][0]
    assert choice["token_ids"] == ref.token_ids
    for got, want in zip(choice["logprobs"], ref.logprobs, strict=True):
        for tok, lp in want.items():
            if str(tok) in got:
                assert abs(got[str(tok)] - lp) < 1e-4, (tok, got[str(tok)], lp)
        assert set(map(int, got)) & set(want)  # the candidates overlap


@pytest.mark.parametrize(
    ("storage_class", "cache_len", "extra_len"),
    [
        ("cold", 300, 0),  # disk; one chunk + a partial one; nothing appended
        ("cold", 1337, 5),  # disk; not a multiple of the block or chunk size
        ("hot", 1000, 77),  # Redis
        ("standard", 2049, 3),  # Redis (standard), 8 chunks
    ],
)
async def test_attach_matches_cold_run(gateway, storage_class, cache_len, extra_len) -> None:  # type: ignore[no-untyped-def]
    ids = corpus_ids(gateway)
    prefix, extra = ids[:cache_len], ids[cache_len : cache_len + extra_len]
    cache = await create(gateway, prefix, compression="none", storage_class=storage_class)
    assert cache["status"] == "ready" and cache["tokens"] == cache_len
    assert cache["stored_tokens"] == cache_len  # the partial last chunk too
    assert cache["stored_bytes"] > 0
    service = gateway.app.state.cache_service
    tenant_keys = await _keys(gateway, prefix, "none")
    tier = "disk" if storage_class == "cold" else "redis"
    assert all(await service.store.tier(tier).exists_many(tenant_keys))

    ref = await cold(gateway, prefix + extra)
    for _ in range(2):  # the second attach may be served from the worker's memory tier
        r = await attach(gateway, cache["id"], extra)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["cache"] == {"id": cache["id"], "hit": True, "miss_reason": None}
        usage = body["usage"]
        # every stored token down to the engine's block (at least one token is computed)
        bs = gateway.app.state.engine.block_size
        assert usage["cached_tokens"] == min(cache_len, cache_len + extra_len - 1) // bs * bs
        assert usage["prompt_tokens"] == cache_len + extra_len
        assert usage["prefill_tokens"] == cache_len + extra_len - usage["cached_tokens"]
        assert_same(body, ref)


async def _keys(gateway, prefix, compression):  # type: ignore[no-untyped-def]
    tenant = await _tenant(gateway)
    return gateway.app.state.cache_service._keys(tenant, prefix, compression)


async def _tenant(gateway):  # type: ignore[no-untyped-def]
    from kvaas.auth.keys import parse_key
    from kvaas.db.repositories import ApiKeyRepository

    async with gateway.app.state.db.session() as s:
        _key, tenant = await ApiKeyRepository(s).get_with_tenant(parse_key(gateway.api_key)[0])
    return tenant


async def test_corrupt_chunk_is_recomputed_and_reported(gateway) -> None:  # type: ignore[no-untyped-def]
    ids = corpus_ids(gateway)[3000:3800]
    cache = await create(gateway, ids, compression="none", storage_class="cold")
    keys = await _keys(gateway, ids, "none")
    disk = gateway.app.state.cache_service.store.tier("disk")
    path = disk.path_of(keys[1])
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    ref = await cold(gateway, [*ids, 10, 11])
    r = await attach(gateway, cache["id"], [10, 11])
    assert r.status_code == 200, r.text
    body = r.json()
    assert_same(body, ref)  # never wrong KV: the corrupt chunk and the rest are recomputed
    assert body["cache"]["hit"] is False
    assert body["cache"]["miss_reason"] == "load_failed"
    assert body["usage"]["cached_tokens"] < 768


async def test_evicted_chunks_miss_and_require_hit(gateway) -> None:  # type: ignore[no-untyped-def]
    """Chunks gone from their only tier: a ``require_hit`` attach is refused (``evicted``) and
    the cache, whose KV is lost, fails (see test_lost_chunks); later attaches are refused."""
    ids = corpus_ids(gateway)[4000:4600]
    cache = await create(gateway, ids, compression="int8", storage_class="cold")
    keys = await _keys(gateway, ids, "int8")
    await gateway.app.state.cache_service.store.tier("disk").delete_many(keys[1:])
    r = await attach(gateway, cache["id"], [5], require_hit=True)
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert err["type"] == "cache_miss" and err["miss_reason"] == "evicted"
    r = await attach(gateway, cache["id"], [5])
    assert r.status_code == 409, r.text  # failed: its stored KV was lost


async def test_partly_evicted_cache_attaches_what_is_left(gateway) -> None:  # type: ignore[no-untyped-def]
    """The first attach of a cache short of chunks answers as a miss (``evicted``) and still
    loads the chunks that are left."""
    ids = corpus_ids(gateway)[5000:5600]
    cache = await create(gateway, ids, compression="int8", storage_class="cold")
    keys = await _keys(gateway, ids, "int8")
    await gateway.app.state.cache_service.store.tier("disk").delete_many(keys[1:])
    r = await attach(gateway, cache["id"], [5])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cache"]["miss_reason"] == "evicted"
    assert body["usage"]["cached_tokens"] == 256  # the first chunk is still there


async def test_short_cache_and_validation(gateway) -> None:  # type: ignore[no-untyped-def]
    c = gateway.client
    # a cache that would hold no full chunk is not created: the answer gives the minimum
    r = await c.post(
        "/v1/cache/create", json={"token_ids": corpus_ids(gateway)[:100]}, headers=gateway.auth()
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "at least 256 tokens" in err["message"] and "has 100" in err["message"]
    assert err["param"] == "prompt"
    cache = await create(gateway, corpus_ids(gateway)[:256])
    assert cache["stored_tokens"] == 256 and cache["compression"] == "int4"
    for body, status in [
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 422),
        ({}, 422),
        ({"prompt": "x", "ttl_seconds": 5}, 400),
        ({"prompt": "x", "model": "gpt-4"}, 400),
        ({"token_ids": [10**9]}, 400),
        ({"token_ids": list(range(5000))}, 400),
        ({"prompt": "x", "compression": "zip"}, 422),
    ]:
        r = await c.post("/v1/cache/create", json=body, headers=gateway.auth())
        assert r.status_code == status, (body, r.text)
        assert "error" in r.json()
    r = await c.post("/v1/cache/create", json={"prompt": "x"})
    assert r.status_code == 401


async def test_ownership_and_expiry_are_404(gateway) -> None:  # type: ignore[no-untyped-def]
    ids = corpus_ids(gateway)[:300]
    cache = await create(gateway, ids, ttl_seconds=60)
    r_other = await attach(gateway, cache["id"], [1], key=gateway.other_key)
    r_unknown = await attach(gateway, "cache_000000000000000000000000", [1])
    assert r_other.status_code == r_unknown.status_code == 404
    assert r_other.json()["error"]["message"].replace(cache["id"], "X") == (
        r_unknown.json()["error"]["message"].replace("cache_000000000000000000000000", "X")
    )
    async with gateway.app.state.db.session() as s:
        await s.execute(
            update(Cache)
            .where(Cache.id == cache["id"])
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        await s.commit()
    r = await attach(gateway, cache["id"], [1])
    assert r.status_code == 404
    async with gateway.app.state.db.session() as s:
        assert (await s.get(Cache, cache["id"])).status == "expired"


async def test_chat_messages_and_streaming(gateway) -> None:  # type: ignore[no-untyped-def]
    source = Path(os.__file__).read_text()[:3000]  # noqa: ASYNC240 - a small local file
    system = "You answer questions about this code:\n" + source
    r = await gateway.client.post(
        "/v1/cache/create",
        json={"messages": [{"role": "system", "content": system}], "compression": "int4"},
        headers=gateway.auth(),
    )
    assert r.status_code == 201, r.text
    cid = r.json()["id"]
    body = {
        "cache_id": cid,
        "messages": [{"role": "user", "content": "What does getenv do?"}],
        "max_tokens": 5,
        "temperature": 0.0,
    }
    plain = await gateway.client.post("/v1/cache/attach", json=body, headers=gateway.auth())
    assert plain.status_code == 200 and plain.json()["cache"]["hit"] is True
    events = []
    async with gateway.client.stream(
        "POST", "/v1/cache/attach", json={**body, "stream": True}, headers=gateway.auth()
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    import json

    chunks = [json.loads(e) for e in events[:-1]]
    tokens = [t for ch in chunks for t in ch["choices"][0]["token_ids"]]
    assert tokens == plain.json()["choices"][0]["token_ids"]
    assert chunks[-1]["cache"]["hit"] is True and chunks[-1]["usage"]["cached_tokens"] > 0


async def test_int4_divergence_through_vllm(gateway) -> None:  # type: ignore[no-untyped-def]
    """int4 is lossy: measure how far the first token's distribution moves (reported in
    docs/architecture.md); it must stay close on this model."""
    ids = corpus_ids(gateway)[5000:6024]
    extra = corpus_ids(gateway)[6024:6040]
    ref = await cold(gateway, ids + extra)
    results = {}
    for scheme in ("int8", "int4"):
        cache = await create(gateway, ids, compression=scheme)
        r = await attach(gateway, cache["id"], extra, logprobs=20, max_tokens=6)
        body = r.json()
        assert body["cache"]["hit"] is True
        got = {int(t): v for t, v in body["choices"][0]["logprobs"][0].items()}
        want = ref.logprobs[0]
        common = set(got) & set(want)
        kl = sum(math.exp(want[t]) * (want[t] - got[t]) for t in common)
        top1 = body["choices"][0]["token_ids"][0] == ref.token_ids[0]
        agree = sum(
            a == b for a, b in zip(body["choices"][0]["token_ids"], ref.token_ids, strict=True)
        )
        results[scheme] = (kl, top1, agree)
        assert top1
        assert abs(kl) < 0.05
    print(
        "divergence vs cold (KL over top-20 of token 1, top-1 same, greedy agreement /6):", results
    )


async def test_a_version_stored_before_partial_chunks_attaches_its_full_chunks(gateway) -> None:  # type: ignore[no-untyped-def]
    """A version whose recorded chunk count holds full chunks only (as every version stored
    before partial last chunks were) is attached as such: its plan names no partial chunk, a
    ``require_hit`` attach hits with the full chunks' tokens (nothing is reported missing,
    though the store holds no partial chunk for it), and the answer is a cold run's."""
    from kvaas.db.models import CacheVersion

    ids = corpus_ids(gateway)[5200:5800]  # two full chunks and 88 tokens
    extra = corpus_ids(gateway)[5800:5805]
    cache = await create(gateway, ids, compression="none", storage_class="cold")
    keys = await _keys(gateway, ids, "none")
    service = gateway.app.state.cache_service
    assert len(keys) == 3 and all(await service.store.exists_many(keys))
    # the store as an older version left it: no partial chunk; its rows count two chunks
    await service.store.tier("disk").delete_many(keys[2:])
    async with gateway.app.state.db.session() as s:
        await s.execute(update(Cache).where(Cache.id == cache["id"]).values(stored_chunks=2))
        await s.execute(
            update(CacheVersion).where(CacheVersion.cache_id == cache["id"]).values(chunks=2)
        )
        await s.commit()
    got = (await gateway.client.get(f"/v1/caches/{cache['id']}", headers=gateway.auth())).json()
    assert got["stored_tokens"] == 512 and got["status"] == "ready"
    r = await attach(gateway, cache["id"], extra, require_hit=True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cache"] == {"id": cache["id"], "hit": True, "miss_reason": None}
    assert body["usage"]["cached_tokens"] == 512
    assert_same(body, await cold(gateway, ids + extra))


async def test_the_gateway_sends_a_checked_plan_of_the_chunks_it_found(gateway) -> None:  # type: ignore[no-untyped-def]
    ids = corpus_ids(gateway)[6000:6600]
    cache = await create(gateway, ids, compression="int8", storage_class="cold")
    service = gateway.app.state.cache_service
    tenant = await _tenant(gateway)
    ask = Sampling(max_tokens=2, temperature=0.0)
    async with gateway.app.state.db.session() as s:
        _, (_c, _v, _ids, plan, expected, available) = await service._prepare_attach(
            s, tenant, CacheRef(cache["id"]), Prompt(token_ids=[7]), ask
        )
        assert plan is not None and plan.checked and len(plan.keys) == 3  # 2 full + partial
        assert available == expected > 0
        # the last two chunks gone: only the one the gateway still finds is planned
        await service.store.tier("disk").delete_many(list(plan.keys[1:]))
        _, (_c, _v, _ids, plan, _e, _a) = await service._prepare_attach(
            s, tenant, CacheRef(cache["id"]), Prompt(token_ids=[7]), ask
        )
        assert plan is not None and plan.checked and len(plan.keys) == 1


async def test_a_checked_chunk_gone_before_the_load_is_recomputed(gateway) -> None:  # type: ignore[no-untyped-def]
    """The scheduler matches a checked plan without a lookup; chunks that are nowhere (as if
    evicted right after the gateway's check) fail the load, and the answer is a cold run's."""
    ids = corpus_ids(gateway)[7000:7600]
    cache = await create(gateway, ids, compression="none", storage_class="cold")
    service = gateway.app.state.cache_service
    tenant = await _tenant(gateway)
    gone = [ChunkKey(secrets.token_bytes(32)) for _ in range(2)]  # stored in no tier
    async with gateway.app.state.db.session() as s:
        row = await service.resolve(s, tenant, cache_id=cache["id"])
    plan = replace(service._load_plan(tenant, row, gone), checked=True)
    # a salt of its own: the engine's prefix cache holds nothing of this prompt under it
    sampling = Sampling(max_tokens=6, temperature=0.0, cache_salt=secrets.token_hex(16))
    gen = await gateway.app.state.engine.generate([*ids, 11], sampling, plan)
    ref = await cold(gateway, [*ids, 11])
    assert gen.token_ids == ref.token_ids
    report = gen.connector
    assert report["matched_tokens"] == 2 * row.chunk_tokens  # trusted: the store was not asked
    assert report["load_failed"] is True and report["loaded_tokens"] == 0
    # billed as computed: the attach's reused tokens exclude a failed load's
    outcome = AttachOutcome(gen, row, len(ids) + 1, 2 * row.chunk_tokens, 2 * row.chunk_tokens)
    assert outcome.cached_tokens == 0 and outcome.miss_reason == "load_failed"
