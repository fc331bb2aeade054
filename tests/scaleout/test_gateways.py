"""Two real gateway processes (``kvaas serve``) on one PostgreSQL schema and one Redis behave
as one: each maintenance step on shared state runs in one of them at a time.

The gateways run without an engine (``KVAAS_ENGINE=none``: the maintenance loop does not need
one) and with a maintenance round every 0.2 s. The moment is chosen, not waited for: the test
takes an exclusive lock on the outbox table and records ``N`` releases in the same
transaction, so every drain that starts meanwhile blocks on its first query (a drain already
past it blocks on its last, the outbox depth, and releases nothing this round); once a drain
is blocked (and the other gateway either blocked too or skipped the step), the test commits
and every drain blocked on its first query sees all ``N`` rows. Without one runner per step
both gateways release every row and count it (``kvaas_store_releases_total`` sums to 2N);
with it one gateway releases each row once and the other skips the step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from kvtest.gateway import ADMIN_TOKEN
from kvtest.services import POSTGRES_URL, REDIS_URL, PgSchema

from kvaas.db import migrate

pytestmark = [pytest.mark.slow]

KVAAS = Path(sys.executable).with_name("kvaas")
READY_TIMEOUT_S = 120.0
SETTLE_TIMEOUT_S = 60.0
RELEASES = 150  # fewer than one drain batch (200): every blocked drain takes them all


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(schema: PgSchema, data: Path, prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVAAS_")}
    return {
        **env,
        "KVAAS_ADMIN_TOKEN": ADMIN_TOKEN,
        "KVAAS_DATABASE_URL": schema.url,
        "KVAAS_DATABASE_TIMEOUT_SECONDS": "60",  # a drain blocked by the test is not cancelled
        "KVAAS_REDIS_URL": REDIS_URL,
        "KVAAS_REDIS_PREFIX": prefix,
        "KVAAS_ENGINE": "none",
        "KVAAS_DATA_DIR": str(data),
        "KVAAS_MAINTENANCE_INTERVAL_SECONDS": "0.2",
        "KVAAS_RATE_LIMIT_PER_SECOND": "0",
    }


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def _spawn(env: dict[str, str], log: Path) -> tuple[str, subprocess.Popen[bytes]]:
    port = _free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(KVAAS), "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return f"http://127.0.0.1:{port}", proc


@contextlib.contextmanager
def _gateways(env: dict[str, str], logs: Path, n: int) -> Iterator[list[str]]:
    """``n`` ``kvaas serve`` processes started at once, until each answers ``/readyz`` (one
    whose port was taken between the pick and the bind starts again on another, twice at
    most)."""
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    try:
        for i in range(n):
            log = logs / f"gateway{i}.log"
            procs.append((*_spawn(env, log), log))
        deadline = time.monotonic() + READY_TIMEOUT_S
        for i in range(n):
            retries = 2
            while True:
                url, proc, log = procs[i]
                if proc.poll() is not None:
                    text = log.read_text()
                    if retries and "address already in use" in text:
                        retries -= 1
                        procs[i] = (*_spawn(env, log), log)
                        continue
                    pytest.fail(f"kvaas serve exited {proc.returncode}:\n{text[-4000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    r = httpx.get(f"{url}/readyz", timeout=5)
                    if r.status_code == 200:
                        break
                if time.monotonic() > deadline:
                    pytest.fail(f"kvaas serve not ready:\n{log.read_text()[-4000:]}")
                time.sleep(0.2)
        yield [url for url, _, _ in procs]
    finally:
        for _, proc, _ in procs:
            _kill(proc)


def _metric(url: str, name: str, **labels: str) -> float:
    """The value of one sample in the gateway's ``/metrics`` (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    head = f"{name}{{{want}}}" if labels else name
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(head + " "):
            return float(line.split()[-1])
    return 0.0


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _blocked_drains(
    conn: psycopg.Connection[tuple[object, ...]], schema: str, *, first: bool = False
) -> int:
    """Gateway connections waiting for a lock on the outbox table: in any of the drain's
    queries, or (``first``) in its first (the one that takes the rows). The test's lock can
    land between a drain's first query and its last (the outbox depth); that drain holds the
    step's lock while it waits, and releases nothing this round."""
    pattern = "%FROM store_releases%ORDER BY store_releases.id%" if first else "%store_releases%"
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND query ILIKE %s AND pid <> pg_backend_pid()",
        (pattern,),
    ).fetchone()
    assert row is not None
    return int(str(row[0]))


def _activity(conn: psycopg.Connection[tuple[object, ...]]) -> str:
    """What every other connection to the database is doing (for a failure message)."""
    rows = conn.execute(
        "SELECT pid, state, wait_event_type, wait_event, left(query, 160) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()",
    ).fetchall()
    return "\n".join(" | ".join(str(c) for c in r) for r in rows)


def _wait(what: str, cond: object, timeout: float = SETTLE_TIMEOUT_S, why: object = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            detail = f":\n{why()}" if why is not None else ""  # type: ignore[operator]
            pytest.fail(f"timed out waiting for {what}{detail}")
        time.sleep(0.1)


@pytest.fixture
def schema() -> Iterator[PgSchema]:
    s = PgSchema()
    try:
        yield s
    finally:
        s.drop()


def test_outbox_drained_once_by_two_gateways(schema: PgSchema, tmp_path: Path) -> None:
    migrate.upgrade(schema.url)
    env = _env(schema, tmp_path / "data", f"kvaas-t{os.getpid()}")
    with _gateways(env, tmp_path, 2) as urls:
        with (
            psycopg.connect(_libpq(schema.url)) as lock,
            psycopg.connect(_libpq(POSTGRES_URL), autocommit=True) as watch,
        ):
            lock.execute("LOCK TABLE store_releases IN ACCESS EXCLUSIVE MODE")
            lock.execute(
                "INSERT INTO store_releases (slot, cache_id, version, chunk_keys, reason,"
                " attempts, created_at, next_attempt_at)"
                " SELECT 's0', 'cache-' || g, 1, '[]', 'deleted', 0, now(), now()"
                " FROM generate_series(1, %s) g",
                (RELEASES,),
            )

            def ready_to_release() -> bool:
                blocked = _blocked_drains(watch, schema.name)
                skipped = sum(
                    _metric(u, "kvaas_maintenance_steps_total", step="drain", result="skipped")
                    for u in urls
                )
                # both gateways inside the drain, or one inside and the other passing it by
                return blocked >= 2 or (blocked == 1 and skipped >= 3)

            def state() -> str:
                drains = {
                    r: [
                        _metric(u, "kvaas_maintenance_steps_total", step="drain", result=r)
                        for u in urls
                    ]
                    for r in ("ran", "skipped", "failed")
                }
                return f"drain steps per gateway: {drains}\n{_activity(watch)}"

            _wait("a drain blocked on the outbox", ready_to_release, why=state)
            taking = _blocked_drains(watch, schema.name, first=True)
            lock.commit()

            def released() -> list[float]:
                return [_metric(u, "kvaas_store_releases_total", result="released") for u in urls]

            # every drain that was blocked taking rows has counted what it released
            _wait(
                "the blocked drains to finish",
                lambda: (
                    sum(released()) >= RELEASES and sum(1 for n in released() if n > 0) >= taking
                ),
                why=state,
            )
            left = watch.execute(f'SELECT count(*) FROM "{schema.name}".store_releases')
            assert left.fetchone() == (0,)
        counts = released()
        assert sum(counts) == RELEASES, f"outbox rows released (per gateway): {counts}"
        assert sorted(counts) == [0, RELEASES]


def test_gateways_started_together_migrate_once(schema: PgSchema, tmp_path: Path) -> None:
    """Two gateways started at once on an empty schema: both migrate it at start-up; neither
    fails (the second waits for the first's migration, then finds the schema current)."""
    env = _env(schema, tmp_path / "data", f"kvaas-t{os.getpid()}m")
    with _gateways(env, tmp_path, 2):
        pass
    for i in range(2):
        log = (tmp_path / f"gateway{i}.log").read_text()
        assert "migration failed" not in log, log[-4000:]


def test_rate_limit_and_idempotency_span_gateways(schema: PgSchema, tmp_path: Path) -> None:
    """A key's rate limit is one budget across both gateways (Redis), and an
    ``Idempotency-Key`` used on one gateway replays on the other (the database)."""
    migrate.upgrade(schema.url)
    env = _env(schema, tmp_path / "data", f"kvaas-t{os.getpid()}r")
    env |= {"KVAAS_RATE_LIMIT_PER_SECOND": "0.001", "KVAAS_RATE_LIMIT_BURST": "4"}
    with _gateways(env, tmp_path, 2) as (g1, g2):
        r = httpx.post(
            f"{g1}/admin/api/tenants",
            json={"name": "acme"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=30,
        )
        assert r.status_code == 201, r.text
        auth = {"Authorization": f"Bearer {r.json()['api_key']['secret']}"}
        # without an engine every POST that runs answers 503 (never stored); a request the
        # API refuses (422) is an answer, stored like any other
        path = "/v1/cache/estimate"
        body = {"prompt": "a prefix", "ttl_seconds": "a while"}
        keyed = {**auth, "Idempotency-Key": "estimate-1"}
        first = httpx.post(f"{g1}{path}", json=body, headers=keyed, timeout=60)
        assert first.status_code == 422, first.text
        again = httpx.post(f"{g2}{path}", json=body, headers=keyed, timeout=60)
        assert again.status_code == 422, again.text
        assert again.headers.get("Idempotent-Replayed") == "true"
        assert again.json() == first.json()
        other = httpx.post(f"{g2}{path}", json={"prompt": "another"}, headers=keyed, timeout=60)
        assert other.status_code == 409, other.text
        # 3 of the burst of 4 are spent (a replay and a conflict count too: each was a
        # request); the 4th passes on either gateway, the 5th is refused on the other
        statuses = [httpx.get(f"{g}/v1/me", headers=auth, timeout=30).status_code for g in (g1, g2)]
        assert statuses == [200, 429], statuses
