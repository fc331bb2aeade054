"""Prompts too long for the model's context are refused from their length in characters,
before tokenizing: a multi-megabyte body never reaches the tokenizer (which would hold a
worker for seconds), on every route that takes a prompt."""

from __future__ import annotations

from typing import Any

import pytest
from kvtest.caches import corpus_ids, new_client

from kvaas.services.prompts import MAX_CHARS_PER_TOKEN

pytestmark = [pytest.mark.engine, pytest.mark.postgres, pytest.mark.redis]


async def test_huge_prompts_are_refused_before_tokenizing(gateway, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cl = await new_client(gateway)
    c = await cl.create(corpus_ids(gateway)[:300])
    engine = gateway.app.state.engine
    limit = engine.max_model_len * MAX_CHARS_PER_TOKEN
    huge = "lorem ipsum " * (limit // 12 + 1)
    assert len(huge) > limit
    calls: list[int] = []
    real_encode, real_messages = engine.model.encode, engine.model.encode_messages

    def encode(text: str, **kw: Any) -> list[int]:
        calls.append(len(text))
        return real_encode(text, **kw)

    def encode_messages(messages: list[dict[str, str]], **kw: Any) -> list[int]:
        calls.append(sum(len(m["content"]) for m in messages))
        return real_messages(messages, **kw)

    monkeypatch.setattr(engine.model, "encode", encode)
    monkeypatch.setattr(engine.model, "encode_messages", encode_messages)
    msgs = [{"role": "user", "content": huge}]
    cases = [
        ("/v1/cache/create", {"prompt": huge}, "prompt"),
        ("/v1/cache/create", {"messages": msgs}, "messages"),
        ("/v1/cache/estimate", {"prompt": huge}, "prompt"),
        ("/v1/chat/completions", {"messages": msgs, "max_tokens": 1}, "messages"),
        ("/v1/completions", {"prompt": huge, "max_tokens": 1}, "prompt"),
    ]
    for path, body, param in cases:
        r = await cl.request("POST", path, json=body)
        assert r.status_code == 400, (path, r.text)
        err = r.json()["error"]
        assert err["param"] == param and f"at most {limit}" in err["message"], (path, err)
    assert calls == []  # nothing reached the tokenizer

    r = await cl.attach(cache_id=c["id"], prompt=huge)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert calls == []
    # text that fits is still tokenized as before
    r = await cl.request("POST", "/v1/completions", json={"prompt": "hello", "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert calls == [5]
