"""Bad input is refused the same way on SQLite and PostgreSQL, with a message that says what
to change: control characters and sizes of names, tags and metadata; empty or whitespace-only
prompts on every route; a cache too short to hold one chunk."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
from kvtest.gateway import ADMIN_TOKEN, new_tenant, running_app

from kvaas.engine import Engine
from kvaas.errors import BadRequest
from kvaas.model_presets import resolve_model
from kvaas.services.prompts import Prompt, PromptPolicy


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(resolve_model("tiny", tmp_path_factory.mktemp("models")))


@pytest.fixture
async def api(
    database_url: str, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    """A gateway without an engine, and a tenant's auth header."""
    settings = {
        "data_dir": tmp_path / "data",
        "database_url": database_url,
        "admin_token": ADMIN_TOKEN,
        "rate_limit_per_second": 0,
    }
    async with running_app(**settings) as (_app, c):
        _t, key = await new_tenant(c, "acme")
        yield c, {"Authorization": f"Bearer {key}"}


BAD_CREATES: list[tuple[dict[str, Any], str, str]] = [
    ({"name": "a\x00b"}, "name", "control character"),
    ({"name": "line\nbreak"}, "name", "control character"),
    ({"name": "x" * 129}, "name", "128"),
    ({"metadata": {"k" * 65: "v"}}, "metadata", "64"),
    ({"metadata": {"": "v"}}, "metadata", "at least 1 character"),
    ({"metadata": {"k\x00": "v"}}, "metadata", "control character"),
    ({"metadata": {"k": "v\x00"}}, "metadata", "control character"),
    ({"metadata": {"k": "v" * 513}}, "metadata", "512"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "16"),
]


@pytest.mark.parametrize(("extra", "param", "says"), BAD_CREATES)
async def test_bad_names_and_metadata_are_422_on_both_databases(
    api: tuple[httpx.AsyncClient, dict[str, str]], extra: dict[str, Any], param: str, says: str
) -> None:
    c, auth = api
    r = await c.post("/v1/cache/create", json={"token_ids": [1] * 300, **extra}, headers=auth)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["type"] == "validation_error"
    assert err["param"].startswith(param), err
    assert says in err["message"], err
    r = await c.patch("/v1/caches/cache_0123456789abcdef01234567", json=extra, headers=auth)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"].startswith(param)


async def test_bad_tag_names_are_422_on_both_databases(
    api: tuple[httpx.AsyncClient, dict[str, str]],
) -> None:
    c, auth = api
    for tag in ("bad%00tag", "x" * 65, "tab%09tag"):
        r = await c.put(f"/v1/tags/{tag}", json={"cache_id": "cache_x"}, headers=auth)
        assert r.status_code == 422, (tag, r.text)
    r = await c.post("/v1/cache/attach", json={"tag": "a\x00b", "prompt": "q"}, headers=auth)
    assert r.status_code == 422, r.text


class _Tokenizer(list[int]):
    pass


def _policy() -> PromptPolicy:
    calls: list[Any] = []

    def encode(text: str, **kw: Any) -> list[int]:
        calls.append(text)
        return [1] * max(1, len(text))

    model = SimpleNamespace(
        name="tiny", tokenizer=_Tokenizer(range(100)), encode=encode, encode_messages=encode
    )
    return PromptPolicy(cast(Engine, SimpleNamespace(model=model, max_model_len=4096)))


@pytest.mark.parametrize(
    "prompt",
    [
        Prompt(prompt=""),
        Prompt(prompt=" \n\t "),
        Prompt(messages=[]),
        Prompt(messages=[{"role": "user", "content": "  "}, {"role": "system", "content": "\n"}]),
    ],
)
@pytest.mark.parametrize("continuation", [False, True])
async def test_empty_or_blank_prompts_are_refused_by_the_policy(
    prompt: Prompt, continuation: bool
) -> None:
    with pytest.raises(BadRequest) as e:
        await _policy().tokenize(prompt, continuation=continuation)
    assert "empty or only whitespace" in e.value.message
    assert e.value.param == ("messages" if prompt.messages is not None else "prompt")


async def test_text_with_content_passes_the_policy() -> None:
    assert await _policy().tokenize(Prompt(prompt=" hi "), continuation=False) == [1] * 4


async def test_every_route_refuses_blank_prompts_and_short_caches(
    database_url: str, tmp_path: Path, tiny: str
) -> None:
    settings = {
        "data_dir": tmp_path / "data",
        "database_url": database_url,
        "admin_token": ADMIN_TOKEN,
        "rate_limit_per_second": 0,
        "engine": "remote",  # a node that is not there: nothing here reaches it
        "engine_urls": ["http://127.0.0.1:9"],
        "model": tiny,
    }
    async with running_app(**settings) as (_app, c):
        _t, key = await new_tenant(c, "acme")
        auth = {"Authorization": f"Bearer {key}"}
        blank_text = {"prompt": "   \n"}
        blank_chat = {"messages": [{"role": "user", "content": " \t"}]}
        for path, body in [
            ("/v1/cache/create", blank_text),
            ("/v1/cache/create", blank_chat),
            ("/v1/cache/estimate", blank_text),
            ("/v1/completions", {**blank_text, "max_tokens": 1}),
            ("/v1/chat/completions", {**blank_chat, "max_tokens": 1}),
        ]:
            r = await c.post(path, json=body, headers=auth)
            assert r.status_code == 400, (path, r.text)
            assert "empty or only whitespace" in r.json()["error"]["message"], (path, r.text)

        r = await c.post("/v1/cache/create", json={"token_ids": [5] * 255}, headers=auth)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "at least 256 tokens" in err["message"] and "255" in err["message"], err
        listed = (await c.get("/v1/caches", headers=auth)).json()
        assert listed["data"] == []
