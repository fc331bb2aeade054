"""The deployment files: every Kubernetes manifest under deploy/ validates against the
Kubernetes schemas (scripts/check_deploy.py), an invalid one is refused, and the compose
``scaled`` profile wires two gateways behind a load balancer to two engine nodes, a Redis
Cluster and PostgreSQL. (``docker compose --profile scaled config -q`` checks the compose
file itself in CI where the docker CLI has compose.)"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvaas.config import Settings

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_deploy.py"


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def validator() -> None:
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.fail(
            "kubernetes-validate is missing: `.venv/bin/pip install kubernetes-validate` "
            "(it belongs in the dev extra)"
        )


def test_manifests_validate(validator: None) -> None:
    r = _check()
    assert r.returncode == 0, r.stdout + r.stderr
    kinds = set()
    for f in (ROOT / "deploy").rglob("*.yaml"):
        kinds |= {d["kind"] for d in yaml.safe_load_all(f.read_text()) if d}
    assert {"Deployment", "StatefulSet", "Service", "Job", "Ingress"} <= kinds


def test_invalid_manifest_refused(validator: None, tmp_path: Path) -> None:
    bad = yaml.safe_load((ROOT / "deploy" / "k8s" / "00-namespace.yaml").read_text())
    bad["spec"] = {"replicas": 2}  # a Namespace has no replicas
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    r = _check(str(tmp_path))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "bad.yaml" in r.stdout and "Namespace/kvaas" in r.stdout


def test_engine_nodes_have_gpus_and_gateways_list_them() -> None:
    docs = [
        d
        for f in sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
        for d in yaml.safe_load_all(f.read_text())
        if d
    ]
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    engine = by[("StatefulSet", "engine")]["spec"]
    res = engine["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "1"
    urls = json.loads(by[("ConfigMap", "kvaas-config")]["data"]["KVAAS_ENGINE_URLS"])
    assert len(urls) == engine["replicas"] == 2
    assert by[("Deployment", "gateway")]["spec"]["replicas"] >= 2
    known = {f"KVAAS_{n.upper()}" for n in Settings.model_fields}
    for name in ("ConfigMap", "Secret"):
        d = by[(name, "kvaas-config" if name == "ConfigMap" else "kvaas-secrets")]
        keys = set(d.get("data") or d.get("stringData"))
        assert {k for k in keys if k.startswith("KVAAS_")} <= known, name


def test_compose_scaled_profile() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    scaled = {n: s for n, s in doc["services"].items() if "scaled" in s.get("profiles", [])}
    gateways = [n for n in scaled if n.startswith("gateway-")]
    engines = [n for n in scaled if n.startswith("engine-")]
    redis = [n for n in scaled if n.startswith("redis-") and n != "redis-cluster-init"]
    assert len(gateways) == 2 and len(engines) == 2 and len(redis) == 6
    known = {f"KVAAS_{n.upper()}" for n in Settings.model_fields}
    for g in gateways:
        env = scaled[g]["environment"]
        assert {k for k in env if k.startswith("KVAAS_")} <= known
        assert (
            env["KVAAS_REDIS_CLUSTER"] == "true" and "@postgres:5432/" in env["KVAAS_DATABASE_URL"]
        )
        assert sorted(json.loads(env["KVAAS_ENGINE_URLS"])) == [
            f"http://{e}:8100" for e in sorted(engines)
        ]
    for r in redis:
        cmd = scaled[r]["command"]
        assert "--cluster-enabled" in cmd and "noeviction" in cmd
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert all(f"server {g}:8000" in conf for g in gateways)
    assert any("./deploy/nginx.conf" in v for v in scaled["lb"]["volumes"])
    assert "postgres" not in scaled  # the same PostgreSQL as the default stack
