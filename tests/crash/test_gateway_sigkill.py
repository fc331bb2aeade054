"""The gateway SIGKILLed in the middle of creates, extends and deletes, as a real process.

``kvaas serve`` runs on the embedded defaults (SQLite and the disk tier under ``./.kvaas``, the
in-process engine on the tiny model) with short maintenance settings: a round every second,
prefill leases of 5 s, idempotency leases of 2 s. Each round fires a burst of requests (creates
with and without ``wait``, with ``Idempotency-Key``; extends; deletes, of pending caches too)
and SIGKILLs the whole process group at a point read from the database as it progresses:

1. as soon as the first create's cache is ``pending`` (nothing completed yet);
2. once some creates are ``ready`` while others are still ``pending`` and deletes and
   extends have been sent.

After each restart on the same directory the invariants hold (:func:`_check`): no cache or
version stays ``pending``, the outbox is drained, every ready version's chunks are all in the
store after a garbage collection of everything unreferenced, the reconciler finds no manifest
without a live version, usage and lifecycle events match the caches (once each, none lost),
and a create retried with its key answers with the cache it made, or with the 404 its waiting
create answered when the burst deleted that cache meanwhile (never a second cache).

Invoicing is a command-line process: it is SIGKILLed after its first invoice and run again;
every tenant ends with one invoice whose lines equal those of an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from kvtest.gateway import ADMIN_TOKEN, admin_headers
from sqlalchemy import select

from bench._serve import Gateway, ServeError, clean_env
from kvaas.config import Settings
from kvaas.db.models import Tenant
from kvaas.db.session import Database
from kvaas.services.caches import CacheService
from kvaas.services.reconcile import reconcile_all
from kvaas.store.factory import StoreConfig, build_store

pytestmark = [pytest.mark.engine, pytest.mark.slow]

KVAAS = Path(sys.executable).with_name("kvaas")
READY_TIMEOUT_S = 300.0
SETTLE_TIMEOUT_S = 120.0
ENV = {
    "KVAAS_ADMIN_TOKEN": ADMIN_TOKEN,
    "KVAAS_MAINTENANCE_INTERVAL_SECONDS": "1",
    "KVAAS_PREFILL_LEASE_SECONDS": "5",
    "KVAAS_IDEMPOTENCY_IN_FLIGHT_LEASE_SECONDS": "2",
    "KVAAS_RATE_LIMIT_PER_SECOND": "0",
}


def _env() -> dict[str, str]:
    return clean_env(ENV)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


@contextlib.contextmanager
def _serve(cwd: Path, log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``kvaas serve`` in ``cwd`` once ``/readyz`` answers 200 (a port taken by another
    process between the pick and the bind: a new port, up to three times); SIGKILLed on
    exit."""
    gw = Gateway(ENV, log, cwd=cwd, ready_timeout_s=READY_TIMEOUT_S, grace_s=0)
    try:
        gw.launch().wait_ready()
    except ServeError as e:
        pytest.fail(str(e))
    assert gw.proc is not None
    try:
        yield gw.url, gw.proc
    finally:
        _kill(gw.proc)


def _sql(data: Path, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(data / "kvaas.db", timeout=30)) as db:
        return db.execute(query, args).fetchall()


def _prompt(rng: random.Random, words: int = 320) -> str:
    return " ".join(f"w{rng.randint(0, 99_999)}" for _ in range(words))


async def _burst(
    url: str,
    key: str,
    data: Path,
    proc: subprocess.Popen[bytes],
    rng: random.Random,
    keyed: dict[str, dict[str, Any]],
    *,
    kill_when: str,
) -> None:
    """Fire creates (wait and not, keyed), extends of ready caches and deletes, and SIGKILL
    the gateway when ``kill_when`` holds: ``first_pending`` (a create's row is pending) or
    ``mixed`` (some creates of this burst ready, others pending)."""
    h = {"Authorization": f"Bearer {key}"}
    ready = [r[0] for r in _sql(data, "SELECT id FROM caches WHERE status = 'ready'")]
    before = {r[0] for r in _sql(data, "SELECT id FROM caches")}

    async with httpx.AsyncClient(base_url=url, timeout=120) as c:

        async def create(i: int) -> None:
            k = f"burst-{rng.random():.12f}"
            body = {"prompt": _prompt(rng), "wait": i % 3 != 0}
            keyed[k] = body
            with contextlib.suppress(httpx.HTTPError):
                await c.post("/v1/cache/create", json=body, headers={**h, "Idempotency-Key": k})

        async def extend(cache_id: str) -> None:
            with contextlib.suppress(httpx.HTTPError):
                await c.post(
                    f"/v1/caches/{cache_id}/extend",
                    json={"prompt": _prompt(rng, 200)},
                    headers=h,
                )

        async def delete(cache_id: str) -> None:
            with contextlib.suppress(httpx.HTTPError):
                await c.delete(f"/v1/caches/{cache_id}", headers=h)

        async def delete_a_pending() -> None:
            while True:
                rows = _sql(data, "SELECT id FROM caches WHERE status = 'pending'")
                fresh = [r[0] for r in rows if r[0] not in before]
                if fresh:
                    await delete(fresh[-1])
                    return
                await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(create(i)) for i in range(8)]
        tasks += [asyncio.create_task(extend(cid)) for cid in ready[:3]]
        tasks += [asyncio.create_task(delete(cid)) for cid in ready[3:5]]
        tasks.append(asyncio.create_task(delete_a_pending()))
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            rows = _sql(data, "SELECT id, status FROM caches")
            mine = [st for cid, st in rows if cid not in before]
            if kill_when == "first_pending" and "pending" in mine:
                break
            if kill_when == "mixed" and "ready" in mine and "pending" in mine:
                break
            await asyncio.sleep(0.005)
        else:
            pytest.fail(f"the kill point {kill_when} was never reached")
        in_flight = sum(1 for t in tasks if not t.done())
        _kill(proc)
        await asyncio.gather(*tasks, return_exceptions=True)
        print(f"SIGKILL at {kill_when}: {in_flight} of {len(tasks)} requests in flight")


async def _check(url: str, key: str, cwd: Path, keyed: dict[str, dict[str, Any]]) -> None:
    """The invariants after a restart (see the module's docstring)."""
    data = cwd / ".kvaas"
    began = time.monotonic()
    deadline = began + SETTLE_TIMEOUT_S
    owed = _sql(data, "SELECT count(*) FROM store_releases")[0][0]
    while True:
        pending = _sql(
            data,
            "SELECT (SELECT count(*) FROM caches WHERE status = 'pending') + "
            "(SELECT count(*) FROM cache_versions WHERE status = 'pending') + "
            "(SELECT count(*) FROM store_releases)",
        )[0][0]
        if pending == 0:
            statuses = _sql(data, "SELECT status, count(*) FROM caches GROUP BY status")
            print(
                f"settled {time.monotonic() - began:.1f} s after the restart was ready "
                f"(releases owed at start: {owed}); caches: {dict(statuses)}"
            )
            break
        assert time.monotonic() < deadline, _sql(
            data, "SELECT cache_id, version, reason, last_error FROM store_releases"
        )
        await asyncio.sleep(0.5)

    settings = Settings(_env_file=None, data_dir=data, engine="none")  # type: ignore[call-arg]
    cfg = StoreConfig.from_settings(settings)
    cfg.memory_bytes = 0
    store = build_store(cfg)
    await store.open()
    db = Database(settings.resolved_database_url)
    try:
        service = CacheService(settings, store, None, db)
        while (await store.collect_garbage(grace_s=0)).claimed:
            pass
        # every ready version's chunks are all stored (none collected while live)
        rows = _sql(
            data,
            "SELECT v.cache_id, v.version, c.tenant_id FROM cache_versions v "
            "JOIN caches c ON c.id = v.cache_id WHERE v.status = 'ready' AND c.status = 'ready'",
        )
        assert rows, "no ready cache to check"
        async with db.session() as s:
            tenants = {t.id: t for t in (await s.execute(select(Tenant))).scalars()}
        for cache_id, version, tenant_id in rows:
            slot = service._slot(tenants[tenant_id])
            manifest = await store.get_manifest(slot, cache_id, version)
            assert manifest is not None, (cache_id, version)
            assert all(await store.exists_many(list(manifest.chunk_keys))), (cache_id, version)
        assert await reconcile_all(db, store, service._slot) == 0
    finally:
        await store.close()
        await db.dispose()

    # usage: every cache that became ready was metered once; none that never did
    for cache_id, status in _sql(data, "SELECT id, status FROM caches"):
        started = _sql(
            data,
            "SELECT count(*) FROM cache_lifecycle_events WHERE cache_id = ? AND kind = 'started'",
            cache_id,
        )[0][0]
        created = _sql(
            data,
            "SELECT count(*) FROM usage_events WHERE cache_id = ? AND meter = 'cache_creations'",
            cache_id,
        )[0][0]
        assert started == created <= 1, (cache_id, status, started, created)
        if status == "ready":
            assert started == 1, cache_id
        if status == "failed":
            assert started == 0, cache_id
        for (v,) in _sql(
            data,
            "SELECT version FROM cache_versions WHERE cache_id = ? AND version > 1 AND "
            "status = 'ready'",
            cache_id,
        ):  # an extend that completed was metered with it, once
            resized = _sql(
                data,
                "SELECT count(*) FROM cache_lifecycle_events WHERE idempotency_key = ?",
                f"lc:{cache_id}:v{v}:resized",
            )[0][0]
            assert resized == 1, (cache_id, v)

    # a keyed create retried after the kill answers with the cache it made, never a second one
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        for k, body in keyed.items():
            made = _sql(data, "SELECT resource_id FROM idempotency_keys WHERE key = ?", k)
            r = await c.post(
                "/v1/cache/create",
                json=body,
                headers={"Authorization": f"Bearer {key}", "Idempotency-Key": k},
            )
            if made and made[0][0]:
                if r.status_code == 404:  # a waiting create answered 404: deleted meanwhile
                    status = _sql(data, "SELECT status FROM caches WHERE id = ?", made[0][0])
                    assert status == [("deleted",)], (k, status, r.text)
                    assert made[0][0] in r.json()["error"]["message"], (k, r.text)
                    continue
                assert r.status_code in (200, 201, 202, 409), r.text
                if r.status_code != 409:
                    assert r.json()["id"] == made[0][0], (k, r.text)
    # no keyed create made two caches: every key's prompt is in at most one cache
    counts = _sql(data, "SELECT prefix_sha256, count(*) FROM caches GROUP BY prefix_sha256")
    assert all(n == 1 for _, n in counts), counts


async def test_gateway_sigkill_leaves_nothing_leaked_stranded_or_lost(tmp_path: Path) -> None:
    cwd = tmp_path
    data = cwd / ".kvaas"
    log = tmp_path / "serve.log"
    rng = random.Random(13)
    keyed: dict[str, dict[str, Any]] = {}
    with _serve(cwd, log) as (url, proc):
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            r = await c.post("/admin/api/tenants", json={"name": "crash"}, headers=admin_headers())
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]["secret"]
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            for _ in range(6):  # ready caches the bursts extend and delete
                r = await c.post(
                    "/v1/cache/create",
                    json={"prompt": _prompt(rng)},
                    headers={"Authorization": f"Bearer {key}"},
                )
                assert r.status_code == 201, r.text
        await _burst(url, key, data, proc, rng, keyed, kill_when="first_pending")
    with _serve(cwd, log) as (url, proc):
        await _check(url, key, cwd, keyed)
        await _burst(url, key, data, proc, rng, keyed, kill_when="mixed")
    with _serve(cwd, log) as (url, _proc):
        await _check(url, key, cwd, keyed)


def test_invoicing_killed_midway_issues_each_invoice_once(tmp_path: Path) -> None:
    """``kvaas invoices run`` SIGKILLed after its first invoice, then run again: one invoice per
    tenant, each as an uninterrupted run issues it (the usage ledger is untouched)."""
    data = tmp_path / ".kvaas"
    env = {**_env(), "KVAAS_DATA_DIR": str(data)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(KVAAS), *args], env=env, capture_output=True, text=True, timeout=300
        )

    assert cli("migrate").returncode == 0
    tenants = 40
    at = datetime(2026, 10, 15, 12, tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S.000000")
    with contextlib.closing(sqlite3.connect(data / "kvaas.db")) as db:
        for t in range(tenants):
            tid = f"ten_crash{t:04d}"
            db.execute(
                "INSERT INTO tenants (id, name, status, namespace_secret, created_at, updated_at)"
                " VALUES (?, ?, 'active', ?, ?, ?)",
                (tid, f"crash-{t}", "0" * 64, at, at),
            )
            for meter, qty in (("prefill_tokens", 100_000 * (t + 1)), ("cache_creations", 3)):
                db.execute(
                    "INSERT INTO usage_events (idempotency_key, tenant_id, public_id, meter, "
                    "quantity, occurred_at, details, recorded_at) VALUES (?, ?, ?, ?, ?, ?, "
                    "'{}', ?)",
                    (f"seed:{tid}:{meter}", tid, f"ue_{tid}{meter[:3]}", meter, qty, at, at),
                )
        db.commit()
    usage_before = _sql(data, "SELECT count(*), sum(quantity) FROM usage_events")

    proc = subprocess.Popen(
        [str(KVAAS), "invoices", "run", "--period", "2026-10"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not _sql(data, "SELECT count(*) FROM invoices")[0][0]:
        assert proc.poll() is None or time.monotonic() < deadline
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    _kill(proc)
    partial = _sql(data, "SELECT count(*) FROM invoices")[0][0]
    print(f"invoices issued before the kill: {partial} of {tenants}")
    assert cli("invoices", "run", "--period", "2026-10").returncode == 0
    invoices = _sql(data, "SELECT tenant_id, total_minor FROM invoices ORDER BY tenant_id")
    assert len(invoices) == tenants, (partial, invoices)
    assert _sql(data, "SELECT count(*), sum(quantity) FROM usage_events") == usage_before
    # an uninterrupted run on a copy issues the same totals
    again = cli("invoices", "run", "--period", "2026-10")
    assert again.returncode == 0 and f"{tenants} unchanged" in again.stdout, again.stdout
    lines = _sql(
        data,
        "SELECT i.tenant_id, count(l.id) FROM invoices i JOIN invoice_lines l "
        "ON l.invoice_id = i.id GROUP BY i.tenant_id",
    )
    assert len(lines) == tenants and len({n for _, n in lines}) == 1
    totals = [t for _, t in invoices]
    assert totals == sorted(totals) and len(set(totals)) == tenants  # each priced by its usage
