"""Start ``kvaas serve`` as a real process, wait for ``/readyz``, stop its process group.

Shared by the benches (and usable by tests) that drive a gateway over HTTP. It imports
nothing of ``kvaas``: the gateway is the console script next to this interpreter, started in
a session of its own (``start_new_session``) so that vLLM's engine core and workers, its
children, are stopped with it.

    with serve({"KVAAS_MODEL": "tiny"}, log_path) as gw:
        httpx.get(f"{gw.url}/readyz")

Contract:

- the environment is this process's **without any** ``KVAAS_`` variable, plus ``env``;
- the port is a free loopback port picked just before the start; when another process took
  it between the pick and the bind (``address already in use`` in the log), a new port is
  tried, up to ``attempts`` times;
- :meth:`Gateway.wait_ready` returns once ``GET /readyz`` answers 200 and raises
  :class:`ServeError` (with the log's tail) when the process exits first or is not ready
  within ``ready_timeout_s``;
- :meth:`Gateway.stop` sends SIGTERM, waits ``grace_s``, then SIGKILLs the whole process
  group (also when the parent is gone but a child was left behind). It is idempotent.

Several gateways start faster side by side: :meth:`Gateway.launch` each, then
:meth:`Gateway.wait_ready` each.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx

#: The console script ``kvaas`` of this interpreter's environment.
KVAAS = Path(sys.executable).with_name("kvaas")


class ServeError(RuntimeError):
    """The gateway exited or was not ready in time; the message ends with its log's tail."""


def free_port() -> int:
    """A loopback port free right now (another process may take it before it is bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(prefix: str = "kvaas-bench-redis-") -> tuple[str, subprocess.Popen[bytes], str]:
    """A throw-away ``redis-server`` on a free loopback port (never the shared one), with no
    persistence, in a new temp directory named ``prefix...``: its URL, process and directory.
    The caller kills the process. Raises :class:`RuntimeError` when it does not answer."""
    import redis

    port = free_port()
    workdir = tempfile.mkdtemp(prefix=prefix)
    server = shutil.which("redis-server") or "redis-server"
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(200):
        try:
            redis.Redis.from_url(url, socket_timeout=1).ping()
            return url, proc, workdir
        except redis.RedisError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the bench's redis-server did not start")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without a single ``KVAAS_`` variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVAAS_")}
    env.update(extra or {})
    return env


class Gateway:
    """One ``kvaas serve`` process on ``127.0.0.1`` (see the module's contract)."""

    def __init__(
        self,
        env: Mapping[str, str],
        log: Path,
        *,
        cwd: Path | None = None,
        args: tuple[str, ...] = (),
        ready_timeout_s: float = 600.0,
        grace_s: float = 60.0,
        attempts: int = 3,
    ) -> None:
        self.env = clean_env(env)
        self.log = log
        self.cwd = cwd
        self.args = args
        self.ready_timeout_s = ready_timeout_s
        self.grace_s = grace_s
        self.attempts = attempts
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0
        self._tries = 0

    def log_tail(self, chars: int = 6000) -> str:
        """The end of the gateway's log (all its starts appended to one file)."""
        with contextlib.suppress(OSError):
            return self.log.read_bytes()[-chars:].decode(errors="replace")
        return ""

    def launch(self) -> Gateway:
        """Start the process on a fresh free port; returns at once (see :meth:`wait_ready`)."""
        self._tries += 1
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(KVAAS), "serve", "--host", "127.0.0.1", "--port", str(port), *self.args],
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self) -> Gateway:
        """Block until ``/readyz`` answers 200 (relaunching on a port taken meanwhile)."""
        while True:
            proc = self.proc
            if proc is None:
                raise ServeError("the gateway was never launched")
            deadline = time.monotonic() + self.ready_timeout_s
            while proc.poll() is None:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                        return self
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServeError(
                        f"kvaas serve not ready after {self.ready_timeout_s:.0f} s:\n"
                        + self.log_tail()
                    )
                time.sleep(0.5)
            self.stop()
            fresh = self.log.read_bytes()[self._offset :].decode(errors="replace")
            if "address already in use" not in fresh or self._tries >= self.attempts:
                raise ServeError(f"kvaas serve exited with {proc.returncode}:\n{self.log_tail()}")
            self.launch()

    def stop(self) -> None:
        """SIGTERM, ``grace_s``, then SIGKILL to the process group; idempotent."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(self.grace_s)
        with contextlib.suppress(ProcessLookupError):  # the process, or a child left behind
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def serve(
    env: Mapping[str, str],
    log: Path,
    *,
    cwd: Path | None = None,
    ready_timeout_s: float = 600.0,
    grace_s: float = 60.0,
) -> Iterator[Gateway]:
    """A ready :class:`Gateway` (``env`` over a ``KVAAS_``-free environment); stopped on exit."""
    gw = Gateway(env, log, cwd=cwd, ready_timeout_s=ready_timeout_s, grace_s=grace_s)
    try:
        yield gw.launch().wait_ready()
    finally:
        gw.stop()
