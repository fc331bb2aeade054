"""The HTTP protocol the service is served with: uvicorn's, with Nagle's algorithm off on every
connection.

uvicorn writes a response's head and its body as two writes. On a connection with Nagle's
algorithm on, the body then waits for the client to acknowledge the head, and clients delay
that acknowledgement (up to 40 ms on Linux) while they wait for the rest: every response with
a body arrives about 40 ms late. asyncio turns Nagle off only on sockets whose protocol number
is TCP's. A listening socket made as ``socket.socket(AF_INET, SOCK_STREAM)`` and handed to
uvicorn in the same process (as the tests and benchmarks serve the app), or one uvicorn makes
with ``socket.fromfd(fd, AF_UNIX, ...)`` for ``--fd``, has protocol number 0, and every
connection it accepts keeps Nagle on. (uvicorn's own sockets for one worker or several are not
affected: they carry the protocol number, the workers' rebuilt from the descriptor.)

:func:`http_protocol` is uvicorn's HTTP protocol class (httptools where installed, else h11,
as uvicorn's ``auto`` chooses), subclassed to set ``TCP_NODELAY`` on each connection as it is
made, whatever made the socket. Pass it as uvicorn's ``http`` option.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Turn Nagle's algorithm off on ``transport``'s socket, when it is a TCP socket."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):  # a socket closed meanwhile
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
except ImportError:  # httptools not installed: uvicorn's pure-Python protocol
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Base  # type: ignore[assignment]


class NoDelayHTTPProtocol(_Base):
    """uvicorn's HTTP protocol with :func:`set_nodelay` on each new connection. A module-level
    class: with several workers uvicorn pickles its configuration (this class included) for
    each worker process."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        set_nodelay(transport)
        super().connection_made(transport)  # type: ignore[arg-type]


def http_protocol() -> type[asyncio.Protocol]:
    """The HTTP protocol class to pass as uvicorn's ``http`` option."""
    return NoDelayHTTPProtocol
