"""Secret settings: blank means unset, for every one of them; a short admin token is refused."""

from __future__ import annotations

import typing

import pytest
from pydantic import SecretStr, ValidationError

from kvaas.config import Settings

SECRET_FIELDS = sorted(
    name
    for name, field in Settings.model_fields.items()
    if SecretStr in typing.get_args(field.annotation) or field.annotation is SecretStr
)


def _settings(**values: str) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def test_the_secret_settings_are_found() -> None:
    assert {"admin_token", "stripe_api_key", "stripe_webhook_secret"} <= set(SECRET_FIELDS)


@pytest.mark.parametrize("field", SECRET_FIELDS)
@pytest.mark.parametrize("blank", ["", "   ", "\t\n"])
def test_a_blank_secret_is_unset(monkeypatch: pytest.MonkeyPatch, field: str, blank: str) -> None:
    monkeypatch.setenv(f"KVAAS_{field.upper()}", blank)
    assert getattr(_settings(), field) is None
    monkeypatch.delenv(f"KVAAS_{field.upper()}")
    assert getattr(_settings(**{field: blank}), field) is None


@pytest.mark.parametrize("token", ["x", "from-dotenv", "a" * 31, " " + "a" * 31 + " "])
def test_a_short_admin_token_is_refused(monkeypatch: pytest.MonkeyPatch, token: str) -> None:
    monkeypatch.setenv("KVAAS_ADMIN_TOKEN", token)
    with pytest.raises(ValidationError, match="KVAAS_ADMIN_TOKEN") as e:
        _settings()
    assert "32 characters" in str(e.value)
    if len(token.strip()) > 8:
        assert token.strip() not in str(e.value)  # the value itself is never echoed


def test_an_admin_token_of_32_characters_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVAAS_ADMIN_TOKEN", "  " + "a" * 32 + "\n")
    token = _settings().admin_token
    assert token is not None and token.get_secret_value() == "a" * 32
