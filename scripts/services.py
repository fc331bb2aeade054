"""Make PostgreSQL and Redis available to the test suite.

``services.py up ENVFILE``: when the servers named by ``KVAAS_TEST_POSTGRES_URL`` /
``KVAAS_TEST_REDIS_URL`` (default 127.0.0.1:5432 database ``test`` and 127.0.0.1:6379) answer,
do nothing. Otherwise start throw-away instances in a temporary directory (when ``initdb`` /
``redis-server`` are installed) and write the variables pointing at them to ENVFILE; if
neither works, exit 1 saying what to start. ``services.py down ENVFILE`` stops what ``up``
started.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

PG_URL = os.environ.get(
    "KVAAS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("KVAAS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_ok(url: str) -> str | None:
    import psycopg

    try:
        with psycopg.connect(url.replace("+psycopg", ""), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return None
    except Exception as e:
        return str(e).strip().splitlines()[0]


def redis_ok(url: str) -> str | None:
    import redis

    try:
        redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3).ping()
        return None
    except Exception as e:
        return str(e)


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def start_postgres(workdir: Path) -> tuple[str, str]:
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        raise RuntimeError("PostgreSQL is not reachable and initdb/pg_ctl are not installed")
    data, port = workdir / "pg", _free_port()
    user = "postgres"
    run_as: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(workdir, "postgres")
    subprocess.run(
        [*run_as, initdb, "-D", str(data), "-U", user, "-A", "trust"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *run_as,
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(workdir / "pg.log"),
            "-w",
            "-o",
            f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *run_as,
            _pg_bin("createdb") or "createdb",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            user,
            "test",
        ],
        check=True,
        capture_output=True,
    )
    return (
        f"postgresql+psycopg://{user}@127.0.0.1:{port}/test",
        f"{pg_ctl}|{data}|{' '.join(run_as)}",
    )


def start_redis(workdir: Path) -> tuple[str, str]:
    server = shutil.which("redis-server")
    if not server:
        raise RuntimeError("Redis is not reachable and redis-server is not installed")
    port = _free_port()
    proc = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(50):
        if redis_ok(url) is None:
            return url, str(proc.pid)
        time.sleep(0.1)
    raise RuntimeError("throw-away redis-server did not start")


def up(envfile: Path) -> int:
    lines: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="kvaas-services-"))
    problems = []
    pg_err = postgres_ok(PG_URL)
    if pg_err is None:
        print(f"==> PostgreSQL reachable at {urlparse(PG_URL).netloc}")
    else:
        try:
            url, handle = start_postgres(workdir)
            lines += [f"KVAAS_TEST_POSTGRES_URL={url}", f"KVAAS_SERVICES_PG={shlex.quote(handle)}"]
            print(f"==> started a throw-away PostgreSQL at {url}")
        except Exception as e:
            problems.append(f"PostgreSQL at {PG_URL}: {pg_err}; could not start one: {e}")
    redis_err = redis_ok(REDIS_URL)
    if redis_err is None:
        print(f"==> Redis reachable at {urlparse(REDIS_URL).netloc}")
    else:
        try:
            url, pid = start_redis(workdir)
            lines += [f"KVAAS_TEST_REDIS_URL={url}", f"KVAAS_SERVICES_REDIS_PID={pid}"]
            print(f"==> started a throw-away Redis at {url}")
        except Exception as e:
            problems.append(f"Redis at {REDIS_URL}: {redis_err}; could not start one: {e}")
    envfile.write_text("\n".join(lines) + "\n")
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        print(
            "Start PostgreSQL (database `test`, trust auth) and Redis, or point "
            "KVAAS_TEST_POSTGRES_URL / KVAAS_TEST_REDIS_URL at running servers.",
            file=sys.stderr,
        )
        down(envfile)
        return 1
    return 0


def down(envfile: Path) -> int:
    if not envfile.exists():
        return 0
    env = dict(
        shlex.split(line)[0].split("=", 1)
        for line in envfile.read_text().splitlines()
        if "=" in line
    )
    if "KVAAS_SERVICES_REDIS_PID" in env:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(env["KVAAS_SERVICES_REDIS_PID"]), signal.SIGTERM)
    if "KVAAS_SERVICES_PG" in env:
        pg_ctl, data, run_as = env["KVAAS_SERVICES_PG"].split("|")
        subprocess.run(
            [*run_as.split(), pg_ctl, "-D", data, "-m", "fast", "stop"], capture_output=True
        )
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("up", "down"):
        print("usage: services.py up|down ENVFILE", file=sys.stderr)
        sys.exit(2)
    sys.exit((up if sys.argv[1] == "up" else down)(Path(sys.argv[2])))
