"""Serve an ASGI app over real HTTP on 127.0.0.1, inside the test's own event loop.

The app keeps running on the loop that opened its resources (database pools, the engine), so
a test can point any HTTP client at it: async clients directly, sync ones from a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn

from kvaas.api.http_protocol import http_protocol


def free_port() -> int:
    """A loopback port free right now (another process may take it before it is bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _InLoopServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # leave the test runner's signals alone
        yield


@contextlib.asynccontextmanager
async def running_server(app: Any, http: Any = None) -> AsyncIterator[tuple[uvicorn.Server, str]]:
    """``async with running_server(app) as (server, base_url)``: the app on a free port of a
    socket made as ``socket.socket(AF_INET, SOCK_STREAM)`` (protocol number 0: asyncio leaves
    Nagle on there), with uvicorn's HTTP protocol ``http`` (default: the service's,
    :func:`kvaas.api.http_protocol.http_protocol`). Its lifespan is the caller's business."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, lifespan="off", log_level="warning", access_log=False, http=http or http_protocol()
    )
    server = _InLoopServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the server stopped before it started")
            await asyncio.sleep(0.02)
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """``async with serve(app) as base_url``: the app on a free port (its lifespan is the
    caller's business: it is not run here)."""
    async with running_server(app) as (_, url):
        yield url
