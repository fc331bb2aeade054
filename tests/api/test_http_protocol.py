"""Nagle's algorithm is off on every connection the service accepts, whatever made its socket.

asyncio turns Nagle off only on sockets with the TCP protocol number. A listening socket made
as ``socket.socket(AF_INET, SOCK_STREAM)`` (protocol number 0) and handed to uvicorn, as the
tests and benchmarks serve the app, kept it on: each response's body waited for the client's
delayed acknowledgement of its head (about 40 ms a response). The tests serve an app over
exactly such a socket and read ``TCP_NODELAY`` off the server's side of the connection, and do
the same on a real ``kvaas serve --workers 2``, whose workers get the service's protocol class
through a pickled configuration.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from kvtest.serve import free_port, running_server

from kvaas.api.http_protocol import http_protocol


async def _app(
    scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _server_nodelay(http: Any) -> list[int]:
    """``TCP_NODELAY`` of the server's side of each connection open after one request."""
    async with (
        running_server(_app, http) as (server, url),
        httpx.AsyncClient() as client,  # keeps the connection open
    ):
        r = await client.post(f"{url}/", content=b"x" * 100)
        assert r.status_code == 200 and r.content == b"ok"
        conns = list(server.server_state.connections)
        assert conns
        return [
            c.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            for c in conns
        ]


async def test_the_service_protocol_turns_nagle_off_on_a_protocol_0_socket() -> None:
    assert all(v != 0 for v in await _server_nodelay(http_protocol()))


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_uvicorn_alone_leaves_nagle_on_there(http: str) -> None:
    """What the service's protocol is for: uvicorn's own protocols keep Nagle on."""
    assert all(v == 0 for v in await _server_nodelay(http))


def _pidfd_getfd(pid: int, fd: int) -> int:
    """A duplicate, in this process, of ``pid``'s file descriptor ``fd`` (``pidfd_getfd``,
    Linux 5.6+; root may take any process's)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        dup = libc.syscall(438, pidfd, fd, 0)  # SYS_pidfd_getfd on x86-64 and arm64
        if dup < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
        return int(dup)
    finally:
        os.close(pidfd)


def _socket_inode(local_port: int, remote_port: int) -> str:
    """The inode of the IPv4 TCP socket from ``local_port`` to ``remote_port``."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == local_port and int(f[2].split(":")[1], 16) == remote_port:
            return f[9]
    raise AssertionError(f"no socket {local_port} -> {remote_port}")


def _server_side(pids: list[int], inode: str) -> tuple[int, int]:
    """(pid, fd) of the process among ``pids`` holding the socket ``inode``."""
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid, int(fd)
    raise AssertionError(f"no process holds socket {inode}")


def test_kvaas_serve_with_several_workers_turns_nagle_off(tmp_path: Path) -> None:
    """The real ``kvaas serve --workers 2``: uvicorn binds that socket itself (protocol number
    0); the server's side of a connection to it has ``TCP_NODELAY`` set."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVAAS_")}
    env |= {
        "KVAAS_ENGINE": "none",
        "KVAAS_DATA_DIR": str(tmp_path),
        "KVAAS_ADMIN_TOKEN": "t" * 40,
        "KVAAS_HOST": "127.0.0.1",
        "KVAAS_PORT": str(port),
    }
    kvaas = Path(sys.executable).with_name("kvaas")
    proc = subprocess.Popen(
        [str(kvaas), "serve", "--workers", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, "kvaas serve exited"
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=5)
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
                if conn.recv(65536).startswith(b"HTTP/1.1 200"):
                    break
                conn.close()
            except OSError:
                pass
            assert time.monotonic() < deadline, "kvaas serve did not answer /healthz"
            time.sleep(0.2)
        with conn:  # kept open: the server's side is still there
            inode = _socket_inode(port, conn.getsockname()[1])
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            pid, fd = _server_side([int(p) for p in children], inode)
            with socket.socket(fileno=_pidfd_getfd(pid, fd)) as theirs:
                assert theirs.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
