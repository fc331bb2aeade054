"""The HTTP protocol the service is served with: uvicorn's, with Nagle's algorithm off on every
connection.

uvicorn writes a response's head and its body as two writes. On a connection with Nagle's
algorithm on, the body then waits for the client to acknowledge the head, and clients delay
that acknowledgement (up to 40 ms on Linux) while they wait for the rest: every response with
a body arrives about 40 ms late. asyncio turns Nagle off only on sockets it made with the
TCP protocol number; uvicorn's own listening socket (several workers, ``--fd``) and any socket
made as ``socket.socket(AF_INET, SOCK_STREAM)`` have protocol number 0 and keep it on.

:func:`http_protocol` is uvicorn's HTTP protocol class (httptools where installed, else h11,
as uvicorn's ``auto`` chooses), subclassed to set ``TCP_NODELAY`` on each connection as it is
made, whatever made the socket. Pass it as uvicorn's ``http`` option.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from typing import Any


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Turn Nagle's algorithm off on ``transport``'s socket, when it is a TCP socket."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):  # a socket closed meanwhile
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@functools.cache
def http_protocol() -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class with :func:`set_nodelay` on each new connection."""
    base: Any
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # httptools not installed: uvicorn's pure-Python protocol
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class NoDelayProtocol(base):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            set_nodelay(transport)
            super().connection_made(transport)

    NoDelayProtocol.__name__ = NoDelayProtocol.__qualname__ = f"NoDelay{base.__name__}"
    return NoDelayProtocol
