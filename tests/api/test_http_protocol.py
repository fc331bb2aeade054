"""Nagle's algorithm is off on every connection the service accepts, whatever made its socket.

uvicorn's listening socket for several workers (and ``--fd``) is made as
``socket.socket(AF_INET, SOCK_STREAM)``, protocol number 0, and asyncio turns Nagle off only
on sockets with the TCP protocol number: on such a socket a response's body waited for the
client's delayed acknowledgement of its head (about 40 ms a response). The test serves an app
over exactly such a socket and reads ``TCP_NODELAY`` off the server's side of the connection.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from kvtest.serve import running_server

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
