"""The OpenAI-compatible surface on the real engine, driven by the official ``openai`` package
over real HTTP: chat and text completions with and without an attached cache, streaming,
models, errors."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

DOC = Path(os.__file__).read_text()[:5000]


@pytest.fixture(scope="module")
async def cache(gateway) -> dict:  # type: ignore[no-untyped-def]
    r = await gateway.client.post(
        "/v1/cache/create",
        json={"messages": [{"role": "system", "content": "Read this module.\n" + DOC}]},
        headers=gateway.auth(),
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["stored_tokens"] >= 256
    return body


def _loaded(cache: dict, gateway) -> int:  # type: ignore[no-untyped-def, type-arg]
    """Tokens an attach loads: every stored one, down to the engine's block size."""
    bs = gateway.app.state.engine.block_size
    return int(cache["stored_tokens"]) // bs * bs


@pytest.fixture
async def oai(gateway, served_gateway: str):  # type: ignore[no-untyped-def]
    async with openai.AsyncOpenAI(
        base_url=f"{served_gateway}/v1", api_key=gateway.api_key, max_retries=0, timeout=300
    ) as client:
        yield client


QUESTION = [{"role": "user", "content": "What does this module do?"}]


async def test_chat_with_attached_cache(oai, cache, gateway) -> None:  # type: ignore[no-untyped-def]
    res = await oai.chat.completions.create(
        model="tiny",
        messages=QUESTION,
        max_tokens=8,
        temperature=0,
        extra_body={"cache_id": cache["id"]},
    )
    assert res.object == "chat.completion"
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].finish_reason in ("stop", "length")
    u = res.usage
    assert u is not None and u.prompt_tokens_details is not None
    assert u.prompt_tokens_details.cached_tokens >= _loaded(cache, gateway) > 0
    assert u.prompt_tokens > cache["tokens"]
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert 1 <= u.completion_tokens <= 8
    extra = res.model_extra or {}
    assert extra["cache"] == {"id": cache["id"], "hit": True, "miss_reason": None}


async def test_streamed_chat_matches_the_plain_answer(oai, cache, gateway) -> None:  # type: ignore[no-untyped-def]
    kwargs = {
        "model": "tiny",
        "messages": QUESTION,
        "max_tokens": 12,
        "temperature": 0,
        "extra_body": {"cache_id": cache["id"]},
    }
    plain = await oai.chat.completions.create(**kwargs)
    stream = await oai.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs
    )
    chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [plain.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens_details.cached_tokens >= _loaded(cache, gateway)
    assert last.usage.completion_tokens == plain.usage.completion_tokens


async def test_completion_with_cache_header_and_stream(oai, cache, served_gateway, gateway) -> None:  # type: ignore[no-untyped-def]
    res = await oai.completions.create(
        model="tiny",
        prompt="\nAnswer:",
        max_tokens=6,
        temperature=0,
        extra_headers={"X-KVaaS-Cache": cache["id"]},
    )
    assert res.object == "text_completion"
    assert res.usage.prompt_tokens_details.cached_tokens >= _loaded(cache, gateway)
    stream = await oai.completions.create(
        model="tiny",
        prompt="\nAnswer:",
        max_tokens=6,
        temperature=0,
        stream=True,
        extra_body={"cache_id": cache["id"]},
    )
    text = "".join([c.choices[0].text async for c in stream])
    assert text == res.choices[0].text
    # the wire format: OpenAI's SSE, ending with [DONE]
    async with httpx.AsyncClient(base_url=served_gateway, timeout=300) as http:
        r = await http.post(
            "/v1/completions",
            json={"prompt": "x", "max_tokens": 2, "stream": True, "cache_id": cache["id"]},
            headers=gateway.auth(),
        )
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


async def test_without_a_cache_the_request_just_runs(oai) -> None:  # type: ignore[no-untyped-def]
    res = await oai.chat.completions.create(
        model="tiny", messages=QUESTION, max_tokens=4, temperature=0
    )
    assert res.usage.prompt_tokens > 0
    assert res.usage.prompt_tokens_details.cached_tokens == 0  # vLLM's prefix cache is off
    assert (res.model_extra or {}).get("cache") is None
    res = await oai.completions.create(model="tiny", prompt=[1, 2, 3, 4], max_tokens=3)
    assert res.usage.prompt_tokens == 4 and res.usage.completion_tokens >= 1


async def test_models(oai) -> None:  # type: ignore[no-untyped-def]
    models = await oai.models.list()
    assert [m.id for m in models.data] == ["tiny"]


async def test_errors_keep_the_api_error_body(oai, cache, gateway, served_gateway) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.NotFoundError) as e:
        await oai.chat.completions.create(
            model="tiny", messages=QUESTION, extra_body={"cache_id": "cache_" + "0" * 24}
        )
    assert e.value.body["type"] == "not_found_error"  # type: ignore[index]
    assert e.value.response.json()["error"]["request_id"] == e.value.request_id
    with pytest.raises(openai.NotFoundError):
        await oai.chat.completions.create(model="gpt-4o", messages=QUESTION)
    with pytest.raises(openai.BadRequestError):  # 400 or 422: both are bad requests
        await oai.chat.completions.create(
            model="tiny", messages=QUESTION, extra_body={"cache_id": cache["id"], "cache_tag": "t"}
        )
    with pytest.raises(openai.UnprocessableEntityError):
        await oai.chat.completions.create(model="tiny", messages=[])
    async with openai.AsyncOpenAI(
        base_url=f"{served_gateway}/v1", api_key="kvs_bad_key", max_retries=0
    ) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
    # another tenant's cache does not exist for this one
    async with openai.AsyncOpenAI(
        base_url=f"{served_gateway}/v1", api_key=gateway.other_key, max_retries=0, timeout=300
    ) as other:
        with pytest.raises(openai.NotFoundError):
            await other.chat.completions.create(
                model="tiny", messages=QUESTION, extra_body={"cache_id": cache["id"]}
            )


async def test_cache_by_tag_in_body_or_header(oai, cache, gateway) -> None:  # type: ignore[no-untyped-def]
    r = await gateway.client.put(
        "/v1/tags/oai-doc", json={"cache_id": cache["id"]}, headers=gateway.auth()
    )
    assert r.status_code == 200, r.text
    by_body = await oai.chat.completions.create(
        model="tiny",
        messages=QUESTION,
        max_tokens=4,
        temperature=0,
        extra_body={"cache_tag": "oai-doc"},
    )
    by_header = await oai.chat.completions.create(
        model="tiny",
        messages=QUESTION,
        max_tokens=4,
        temperature=0,
        extra_headers={"X-KVaaS-Cache": "oai-doc"},
    )
    for res in (by_body, by_header):
        assert (res.model_extra or {})["cache"]["id"] == cache["id"]
        assert res.usage.prompt_tokens_details.cached_tokens >= _loaded(cache, gateway)
    assert by_body.choices[0].message.content == by_header.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        await oai.chat.completions.create(
            model="tiny", messages=QUESTION, extra_headers={"X-KVaaS-Cache": "no-such-tag"}
        )
