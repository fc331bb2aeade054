"""Settings: defaults, environment, .env, validation, and the configuration page's table."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from kvaas.config import Settings, settings_markdown_table

ROOT = Path(__file__).resolve().parents[2]


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("KVAAS_"):
            monkeypatch.delenv(k)


def test_embedded_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clean_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert s.database_url is None
    assert s.resolved_database_url == f"sqlite+aiosqlite:///{(tmp_path / '.kvaas/kvaas.db')}"
    assert s.redis_url is None and s.model == "tiny"
    assert s.resolved_disk_tier_dir == Path(".kvaas/chunks")


def test_env_and_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clean_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    token = "from-dotenv-0123456789abcdefghijklmn"
    (tmp_path / ".env").write_text(f"KVAAS_PORT=9100\nKVAAS_ADMIN_TOKEN={token}\n")
    monkeypatch.setenv("KVAAS_PORT", "9200")  # the environment wins over .env
    monkeypatch.setenv("KVAAS_DATABASE_URL", "postgres://u:p@db:5432/kvaas")
    s = Settings()
    assert s.port == 9200
    assert s.admin_token is not None and s.admin_token.get_secret_value() == token
    assert s.database_url == "postgresql+psycopg://u:p@db:5432/kvaas"
    assert "from-dotenv" not in repr(s)  # secrets are masked


def test_invalid_values_name_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_env(monkeypatch)
    monkeypatch.setenv("KVAAS_PORT", "99999")
    with pytest.raises(ValidationError, match="port"):
        Settings(_env_file=None)  # type: ignore[call-arg]
    monkeypatch.delenv("KVAAS_PORT")
    monkeypatch.setenv("KVAAS_ENGINE", "remote")
    with pytest.raises(ValidationError, match="KVAAS_ENGINE_URLS"):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_configuration_page_documents_every_setting() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert settings_markdown_table() in page, (
        "docs/configuration.md is stale: regenerate its table with `kvaas config markdown`"
    )
