"""The `kvaas` command: real subprocesses against a real database."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kvaas.app import create_app
from kvaas.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def kvaas(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvaas.cli", *args],
        env={**os.environ, **env, "COLUMNS": "200"},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_version_and_help(tmp_path: Path) -> None:
    from kvaas import __version__

    r = kvaas("--version", env={}, cwd=tmp_path)
    assert r.returncode == 0 and __version__ in r.stdout
    for cmd in (
        [],
        ["tenants"],
        ["keys"],
        ["tenants", "create"],
        ["keys", "revoke"],
        ["serve"],
        ["migrate"],
        ["openapi"],
    ):
        r = kvaas(*cmd, "--help", env={}, cwd=tmp_path)
        assert r.returncode == 0, (cmd, r.stderr)
        assert "Usage" in r.stdout


def test_every_command_module_is_registered(tmp_path: Path) -> None:
    groups = {
        "tenants": ["create", "list", "disable", "enable"],
        "keys": ["create", "list", "revoke"],
        "config": ["show", "markdown"],
        "engine": ["command"],
        "models": ["list", "build"],
        "codec": ["eval"],
        "invoices": ["run", "sync"],
    }
    r = kvaas("--help", env={}, cwd=tmp_path)
    listed = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("│ ")]
    assert listed[-10:] == ["serve", "migrate", "openapi", *groups]
    for group, commands in groups.items():
        r = kvaas(group, "--help", env={}, cwd=tmp_path)
        assert r.returncode == 0, (group, r.stderr)
        listed = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("│ ")]
        assert listed[-len(commands) :] == commands, group


def test_only_the_entry_point_imports_the_cli() -> None:
    """Library code never imports ``kvaas.cli`` (the command line depends on it, not back)."""
    offenders = []
    for path in (ROOT / "kvaas").rglob("*.py"):
        if (ROOT / "kvaas" / "cli") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            if any(n == "kvaas.cli" or n.startswith("kvaas.cli.") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


async def test_tenant_key_lifecycle_from_the_cli(database_url: str, tmp_path: Path) -> None:
    env = {"KVAAS_DATABASE_URL": database_url, "KVAAS_DATA_DIR": str(tmp_path / "d")}
    r = kvaas("migrate", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = kvaas("tenants", "create", "acme", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert key.startswith("kvs_") and "acme" in r.stderr

    # the printed key authenticates against the API on the same database
    app = create_app(
        Settings(
            _env_file=None,
            database_url=database_url,
            engine="none",  # type: ignore[call-arg]
            data_dir=tmp_path / "d",
        )
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r2 = await c.get("/v1/me", headers={"Authorization": f"Bearer {key}"})
            assert r2.status_code == 200 and r2.json()["tenant_name"] == "acme"

            r = kvaas("tenants", "create", "acme", env=env, cwd=tmp_path)
            assert r.returncode == 1 and "already exists" in r.stderr
            r = kvaas("tenants", "create", "Bad Name", env=env, cwd=tmp_path)
            assert r.returncode == 2
            r = kvaas("keys", "create", "acme", "--name", "second", env=env, cwd=tmp_path)
            assert r.returncode == 0 and r.stdout.strip().startswith("kvs_")
            r = kvaas("keys", "list", "acme", env=env, cwd=tmp_path)
            assert r.returncode == 0 and "second" in r.stdout and key not in r.stdout
            prefix = key.split("_")[1]
            r = kvaas("keys", "revoke", prefix, env=env, cwd=tmp_path)
            assert r.returncode == 0, r.stderr
            r2 = await c.get("/v1/me", headers={"Authorization": f"Bearer {key}"})
            assert r2.status_code == 401
            r = kvaas("keys", "revoke", "nosuchprefix", env=env, cwd=tmp_path)
            assert r.returncode == 1 and "no API key" in r.stderr
            r = kvaas("tenants", "disable", "acme", env=env, cwd=tmp_path)
            assert r.returncode == 0
            r = kvaas("tenants", "list", env=env, cwd=tmp_path)
            assert "disabled" in r.stdout


def test_unreachable_database_exits_3(tmp_path: Path) -> None:
    env = {"KVAAS_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    r = kvaas("tenants", "list", env=env, cwd=tmp_path)
    assert r.returncode == 3 and "database unavailable" in r.stderr


@pytest.mark.parametrize("var", ["KVAAS_PORT=notanumber"])
def test_bad_configuration_exits_2(var: str, tmp_path: Path) -> None:
    k, v = var.split("=")
    r = kvaas("tenants", "list", env={k: v}, cwd=tmp_path)
    assert (
        r.returncode == 2 and "KVAAS_PORT" in r.stderr.upper().replace("\n", "")
    ) or "port" in r.stderr


def test_config_show_masks_passwords_in_urls(tmp_path: Path) -> None:
    env = {
        "KVAAS_DATABASE_URL": "postgresql+psycopg://kv:dbsecret123@db.example:5432/kvaas",
        "KVAAS_REDIS_URL": "redis://:redissecret456@cache.example:6379/0",
        "COLUMNS": "400",  # one table row per line
    }
    r = kvaas("config", "show", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = r.stdout.replace("\n", "")
    assert "dbsecret123" not in text and "redissecret456" not in text
    assert "kv:***@db.example" in text and ":***@cache.example" in text
