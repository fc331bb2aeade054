"""The Python client (sync and async) against the real gateway over HTTP: create, attach,
streaming, error mapping, idempotent retries, and retries on a real 429."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from kvtest.gateway import ADMIN_TOKEN, new_tenant
from kvtest.serve import serve
from kvtest.services import REDIS_URL, PgSchema

from kvaas.app import create_app
from kvaas.billing.invoices import Draft, issue_invoice, parse_period
from kvaas.client import (
    AsyncKVaaS,
    AuthenticationError,
    BadRequestError,
    EngineUnavailableError,
    KVaaS,
    NotFoundError,
    RateLimitError,
    ValidationError,
)
from kvaas.config import Settings
from kvaas.engine import Sampling

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

DOC = Path(os.__file__).read_text()[:4000]


async def test_async_client_create_attach_stream(gateway, served_gateway: str) -> None:  # type: ignore[no-untyped-def]
    model = gateway.app.state.engine.model
    prefix, suffix = model.encode(DOC), model.encode("\nclass", add_special_tokens=False)
    chunk = gateway.settings.chunk_tokens
    async with AsyncKVaaS(served_gateway, gateway.api_key) as kv:
        cache = await kv.create_cache(
            prompt=DOC, name="doc", metadata={"k": "v"}, compression="none"
        )
        assert cache.id.startswith("cache_") and cache.status == "ready"
        assert cache.name == "doc" and cache.metadata == {"k": "v"}
        assert cache.tokens == len(prefix) and cache.compression == "none"
        assert cache.stored_tokens == len(prefix) >= chunk
        out = await kv.attach(cache.id, prompt="\nclass", max_tokens=8, temperature=0)
        assert out.cache.hit and out.cache.id == cache.id
        bs = gateway.app.state.engine.block_size
        assert out.usage.cached_tokens == cache.stored_tokens // bs * bs
        assert out.usage.prompt_tokens == len(prefix) + len(suffix)
        assert out.usage.prefill_tokens == out.usage.prompt_tokens - out.usage.cached_tokens
        ref = await gateway.app.state.engine.generate(
            prefix + suffix, Sampling(max_tokens=8, temperature=0.0)
        )
        assert out.choices[0].token_ids == ref.token_ids  # what a cold run generates
        assert out.usage.output_tokens == len(ref.token_ids) >= 1
        chunks = [
            c
            async for c in kv.attach_stream(cache.id, prompt="\nclass", max_tokens=8, temperature=0)
        ]
        assert "".join(c.text for c in chunks) == out.text
        assert [t for c in chunks for ch in c.choices for t in ch.token_ids] == ref.token_ids
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.cached_tokens == out.usage.cached_tokens
        assert chunks[-1].cache is not None and chunks[-1].cache.id == cache.id
        assert chunks[-1].cache.hit
        assert [m.id for m in await kv.models()] == ["tiny"]


async def test_sync_client_and_errors(gateway, served_gateway: str) -> None:  # type: ignore[no-untyped-def]
    def scenario() -> None:
        with KVaaS(served_gateway, gateway.api_key, max_retries=0) as kv:
            cache = kv.create_cache(prompt=DOC, storage_class="cold", compression="int8")
            assert cache.storage_class == "cold" and cache.compression == "int8"
            out = kv.attach(cache.id, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            assert out.cache.hit and out.usage.prompt_tokens > cache.tokens  # type: ignore[operator]
            plain = kv.attach(cache.id, prompt="x", max_tokens=3, temperature=0)
            stream = kv.attach_stream(cache.id, prompt="x", max_tokens=3, temperature=0)
            assert "".join(c.text for c in stream) == plain.text
            assert plain.usage.output_tokens == len(plain.choices[0].token_ids) >= 1

            with pytest.raises(NotFoundError) as e:
                kv.attach("cache_" + "0" * 24, prompt="x")
            assert e.value.status_code == 404 and e.value.type == "not_found_error"
            assert e.value.request_id and e.value.request_id.startswith("req_")
            assert e.value.body["request_id"] == e.value.request_id
            with pytest.raises(BadRequestError) as e:
                kv.create_cache(prompt="x", ttl_seconds=1)
            assert e.value.param == "ttl_seconds"
            with pytest.raises(ValidationError):
                kv.create_cache(prompt="x", storage_class="lukewarm")
            with pytest.raises(BadRequestError) as e:  # not one full chunk: not created
                kv.create_cache(prompt="a short prefix")
            assert "at least 256 tokens" in e.value.message and e.value.param == "prompt"
        with KVaaS(served_gateway, "kvs_nope_nope") as bad, pytest.raises(AuthenticationError):
            bad.models()
        # another tenant's cache does not exist for this one
        with KVaaS(served_gateway, gateway.other_key) as other, pytest.raises(NotFoundError):
            other.attach(cache.id, prompt="x")

    await asyncio.to_thread(scenario)


async def test_an_idempotency_key_creates_once(gateway, served_gateway: str) -> None:  # type: ignore[no-untyped-def]
    async with AsyncKVaaS(served_gateway, gateway.api_key) as kv:
        key = f"create-{secrets.token_hex(6)}"
        first = await kv.create_cache(prompt=DOC[:2000], idempotency_key=key)
        again = await kv.create_cache(prompt=DOC[:2000], idempotency_key=key)
        assert again.id == first.id and again.created_at == first.created_at  # type: ignore[attr-defined]
        other = await kv.create_cache(prompt=DOC[:2000])  # a fresh key: a new cache
        assert other.id != first.id


@pytest.fixture(scope="module")
async def strict_gateway(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[str, str]]:
    """A gateway without an engine, rate limited to 1 request/s per key (bursts of 1) in real
    Redis, served over HTTP: (base URL, API key)."""
    schema = PgSchema()
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=tmp_path_factory.mktemp("strict"),
        database_url=schema.url,
        admin_token=ADMIN_TOKEN,
        engine="none",
        redis_url=REDIS_URL,
        redis_prefix=f"kvtest-{secrets.token_hex(4)}",
        rate_limit_per_second=1.0,
        rate_limit_burst=1,
    )
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                _tenant, key = await new_tenant(c, "strict")
            async with serve(app) as url:
                yield url, key
    finally:
        schema.drop()


async def test_retries_honour_a_real_429(strict_gateway) -> None:  # type: ignore[no-untyped-def]
    url, key = strict_gateway
    seen: list[tuple[int, str | None]] = []

    async def record(r: httpx.Response) -> None:
        seen.append((r.status_code, r.headers.get("retry-after")))

    async with httpx.AsyncClient(event_hooks={"response": [record]}) as http:
        kv = AsyncKVaaS(url, key, http_client=http, max_retries=3)
        assert await kv.models() == []  # no engine: no models
        assert await kv.models() == []  # 429 first, then the retry after Retry-After
        assert [s for s, _ in seen[:2]] == [200, 429]
        assert seen[1][1] == "1" and seen[-1][0] == 200
        impatient = AsyncKVaaS(url, key, http_client=http, max_retries=0)
        with pytest.raises(RateLimitError) as e:
            await impatient.models()
        assert e.value.type == "rate_limit_error"
        assert e.value.response is not None and e.value.response.headers["retry-after"] == "1"


async def test_post_retries_reuse_one_idempotency_key(strict_gateway) -> None:  # type: ignore[no-untyped-def]
    url, key = strict_gateway
    sent: list[tuple[str, str | None]] = []
    statuses: list[int] = []

    async def record(r: httpx.Request) -> None:
        sent.append((r.url.path, r.headers.get("idempotency-key")))

    async def status(r: httpx.Response) -> None:
        statuses.append(r.status_code)

    hooks = {"request": [record], "response": [status]}
    async with httpx.AsyncClient(event_hooks=hooks) as http:  # type: ignore[arg-type]
        kv = AsyncKVaaS(url, key, http_client=http, max_retries=4, backoff_s=0.05)
        # no engine: 503 on every try that the rate limit lets through, 429 on the others
        with pytest.raises((EngineUnavailableError, RateLimitError)):
            await kv.create_cache(prompt="x")
    assert 503 in statuses and set(statuses) <= {429, 503}
    keys = {k for _, k in sent}
    assert len(sent) == 5 and len(keys) == 1 and None not in keys


async def test_lifecycle_tags_and_listing(gateway, served_gateway: str) -> None:  # type: ignore[no-untyped-def]
    async with AsyncKVaaS(served_gateway, gateway.api_key) as kv:
        name = f"listed-{secrets.token_hex(4)}"
        made = [await kv.create_cache(prompt=f"{i} {DOC[:1200]}", name=name) for i in range(3)]
        listed = [c.id async for c in kv.list_caches(name=name, page_size=2)]  # two pages
        assert sorted(listed) == sorted(c.id for c in made)
        got = await kv.get_cache(made[0].id)
        assert got.id == made[0].id and got.name == name
        patched = await kv.update_cache(made[0].id, metadata={"team": "x"})
        assert patched.metadata == {"team": "x"}
        tag = f"t-{secrets.token_hex(4)}"
        put = await kv.put_tag(tag, made[1].id)
        assert (put.name, put.cache_id) == (tag, made[1].id)  # type: ignore[attr-defined]
        assert (await kv.get_tag(tag)).cache_id == made[1].id  # type: ignore[attr-defined]
        assert tag in [t.name async for t in kv.list_tags()]  # type: ignore[attr-defined]
        out = await kv.attach(tag=tag, prompt="x", max_tokens=2)
        assert out.cache.id == made[1].id
        gone = await kv.delete_tag(tag)
        assert gone is not None and gone.model_dump() == {
            "object": "tag",
            "name": tag,
            "deleted": True,
        }
        with pytest.raises(NotFoundError):
            await kv.get_tag(tag)
        versions = await kv.list_versions(made[2].id)
        assert [v.version for v in versions] == [1]  # type: ignore[attr-defined]
        deleted = await kv.delete_cache(made[2].id)
        assert deleted is not None and deleted.id == made[2].id  # type: ignore[attr-defined]
        assert deleted.status == "deleted"  # type: ignore[attr-defined]
        with pytest.raises(NotFoundError):
            await kv.get_cache(made[2].id)


async def test_estimate_usage_invoices(gateway, served_gateway: str) -> None:  # type: ignore[no-untyped-def]
    """A fresh tenant: the estimate of a prompt matches the cache created from it, its usage
    counts that one creation, and it lists exactly the invoice issued to it."""
    tenant, key = await new_tenant(gateway.client, f"billed-{secrets.token_hex(4)}")
    async with AsyncKVaaS(served_gateway, key) as kv:
        est = await kv.estimate(prompt=DOC[:2000], ttl_seconds=3600, expected_attaches=10)
        cache = await kv.create_cache(prompt=DOC[:2000], ttl_seconds=3600)
        sized = est.model_dump()
        assert sized["object"] == "cache_estimate" and sized["ttl_seconds"] == 3600
        assert (sized["tokens"], sized["stored_tokens"]) == (cache.tokens, cache.stored_tokens)
        assert (sized["storage_class"], sized["compression"]) == (
            cache.storage_class,
            cache.compression,
        )

        usage = await kv.usage(granularity="day")
        assert usage.object == "usage" and usage.granularity == "day"  # type: ignore[attr-defined]
        assert usage.totals["cache_creations"] == 1  # type: ignore[attr-defined]
        # ``from_`` goes out as ``from``: two empty days long before the tenant existed
        past = await kv.usage(
            granularity="day", from_="2020-01-01T00:00:00Z", to="2020-01-03T00:00:00Z"
        )
        assert datetime.fromisoformat(past.model_dump()["from"]) == datetime(2020, 1, 1, tzinfo=UTC)
        assert len(past.buckets) == 2 and past.totals["cache_creations"] == 0  # type: ignore[attr-defined]

        assert await kv.list_invoices() == []
        start, end = parse_period("2020-01")
        book = gateway.app.state.pricebook
        draft = Draft(tenant["id"], "2020-01", start, end, book.versions[0].version, book.currency)
        async with gateway.app.state.db.session() as s:
            invoice = await issue_invoice(s, draft)
        assert invoice is not None
        assert [i.id for i in await kv.list_invoices()] == [invoice.id]  # type: ignore[attr-defined]
        got = (await kv.get_invoice(invoice.id)).model_dump()
        assert (got["id"], got["period"], got["total_minor"]) == (invoice.id, "2020-01", 0)
        with pytest.raises(NotFoundError):
            await kv.get_invoice("inv_" + "0" * 24)
