"""PostgreSQL restarted under load: requests in flight and those sent while it is down answer
503 (``service_unavailable``, never 500), and the gateway serves again as soon as it is back,
without a restart of its own (the pool replaces the dead connections).

The test runs its OWN PostgreSQL (``initdb`` into a temporary directory, another port), never
the shared one."""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kvtest.gateway import running_app

pytestmark = [pytest.mark.slow]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


class OwnPostgres:
    """A PostgreSQL server of this test alone, in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not (initdb and self.pg_ctl):
            pytest.skip("initdb/pg_ctl are not installed")
        self.workdir, self.data = workdir, workdir / "pg"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.run_as: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            self.run_as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(workdir, "postgres")
        subprocess.run(
            [*self.run_as, initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust"],
            check=True,
            capture_output=True,
        )
        self.start()
        createdb = _pg_bin("createdb") or "createdb"
        subprocess.run(
            [
                *self.run_as,
                createdb,
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "fault",
            ],
            check=True,
            capture_output=True,
        )
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/fault"

    def _ctl(self, *args: str) -> None:
        assert self.pg_ctl
        subprocess.run(
            [*self.run_as, self.pg_ctl, "-D", str(self.data), "-w", *args],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1"
        self._ctl("-l", str(self.workdir / "pg.log"), "-o", opts, "start")

    def stop(self) -> None:
        """Stop at once: every connection is cut, as in a crash or a failover."""
        self._ctl("-m", "immediate", "stop")


@pytest.fixture
def own_pg() -> Iterator[OwnPostgres]:
    # not under pytest's temporary directory: the postgres user cannot enter root's
    workdir = Path(tempfile.mkdtemp(prefix="kvaas-own-pg-"))
    try:
        pg = OwnPostgres(workdir)
        try:
            yield pg
        finally:
            subprocess.run(
                [*pg.run_as, pg.pg_ctl or "pg_ctl", "-D", str(pg.data), "-m", "immediate", "stop"],
                capture_output=True,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def test_postgres_restart_mid_load(own_pg: OwnPostgres, tmp_path: Path) -> None:
    from kvtest.gateway import ADMIN_TOKEN

    async with running_app(
        database_url=own_pg.url,
        data_dir=tmp_path / "data",
        admin_token=ADMIN_TOKEN,
        database_timeout_seconds=2.0,
        database_pool_size=4,
        rate_limit_per_second=0,
    ) as (app, c):
        from kvtest.gateway import new_tenant

        _, key = await new_tenant(c)
        auth = {"Authorization": f"Bearer {key}"}
        paths = ["/v1/caches", "/v1/me", "/v1/usage"]

        async def one(path: str) -> int:
            return (await c.get(path, headers=auth)).status_code

        for p in paths:
            assert await one(p) == 200, p

        seen: list[int] = []
        stop = asyncio.Event()

        async def load() -> None:
            i = 0
            while not stop.is_set():
                seen.append(await one(paths[i % len(paths)]))
                i += 1
                await asyncio.sleep(0.02)

        workers = [asyncio.create_task(load()) for _ in range(6)]
        await asyncio.sleep(0.5)
        await asyncio.to_thread(own_pg.stop)
        while_down = [await c.get(p, headers=auth) for p in paths]
        await asyncio.to_thread(own_pg.start)
        restarted = time.monotonic()
        # every request of the load and while down: 200 or a clean 503, never a 500
        after_restart = len(seen)
        deadline = time.monotonic() + 60
        while not all(s == 200 for s in seen[-12:]) or len(seen) < after_restart + 12:
            assert time.monotonic() < deadline, f"no recovery: {seen[-12:]}"
            await asyncio.sleep(0.2)
        recovered = time.monotonic() - restarted
        stop.set()
        await asyncio.gather(*workers)
        print(
            f"[fault] PostgreSQL restarted: {seen.count(503)} of {len(seen)} requests 503, "
            f"none 500; serving {recovered:.1f} s after it was back"
        )

        assert [r.status_code for r in while_down] == [503, 503, 503]
        for r in while_down:  # the standard body, and a hint to retry
            assert r.json()["error"]["type"] == "service_unavailable"
            assert "Retry-After" in r.headers
        assert set(seen) <= {200, 503}, sorted(set(seen))
        assert 503 in seen  # the load did run into the restart
        r = await c.get("/v1/caches", headers=auth)
        assert r.status_code == 200
        ready = await c.get("/readyz")
        assert ready.json()["components"]["database"]["status"] == "ok"
        assert app.state.db.dialect == "postgresql"
