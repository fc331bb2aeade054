"""docker-compose.yml wires the gateway to PostgreSQL and Redis with health checks and volumes.

(`docker compose config` validates the file in CI where the docker CLI has compose; this test
checks the wiring everywhere.)"""

from __future__ import annotations

from pathlib import Path

import yaml

from kvaas.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_compose_wiring() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    # the default stack (the scaled profile's services: tests/scaleout/test_deploy.py)
    services = {n: s for n, s in doc["services"].items() if not s.get("profiles")}
    assert set(services) == {"gateway", "postgres", "redis"}
    for name, svc in services.items():
        assert "healthcheck" in svc and svc["healthcheck"]["test"], name
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            assert src.startswith("/") or src in doc["volumes"], (name, vol)
    gw = services["gateway"]
    env = gw["environment"]
    assert "@postgres:5432/" in env["KVAAS_DATABASE_URL"]
    assert env["KVAAS_REDIS_URL"].startswith("redis://redis:6379")
    known = {f"KVAAS_{n.upper()}" for n in Settings.model_fields}
    assert set(k for k in env if k.startswith("KVAAS_")) <= known, "unknown KVAAS_ variable"
    assert {d: c["condition"] for d, c in gw["depends_on"].items()} == {
        "postgres": "service_healthy",
        "redis": "service_healthy",
    }
    assert "--appendonly" in services["redis"]["command"]
    assert (ROOT / gw["build"]["context"] / "Dockerfile").exists()
