"""The synchronous client: the endpoints of :class:`~kvaas.client.endpoints.Endpoints` over an
``httpx.Client``."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

import httpx

from ._base import ClientBase, answer_json
from ._spec import Call, End, Listing, Stream
from .endpoints import Endpoints
from .errors import APIConnectionError, error_from_response
from .types import APIObject

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T", bound=APIObject)


class KVaaS(Endpoints, ClientBase[httpx.Client]):
    """Synchronous client. Use as a context manager, or call :meth:`close`.

    ``http_client``: an ``httpx.Client`` to send with (it is left open on :meth:`close`); the
    other settings are :class:`~kvaas.client._base.ClientBase`'s."""

    _http_class = httpx.Client

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> KVaaS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # transport ------------------------------------------------------------------------------
    def _send(self, call: Call[Any], *, stream: bool = False) -> httpx.Response:
        """The successful answer to ``call``, retried as the policy says; raises the error
        of an error answer, :class:`APIConnectionError` when no answer came."""
        headers = self._headers(call)
        attempt = 0
        wait: float | None
        while True:
            try:
                r = self._http.send(self._request(call, headers), stream=stream)
            except httpx.TransportError as e:
                wait = self._wait_after_failure(attempt, e)
            else:
                wait = self._retry_wait(attempt, r)
                if wait is None:
                    if r.status_code >= 400:
                        r.read()
                        r.close()
                        raise error_from_response(r)
                    return r
                r.close()
            time.sleep(wait)
            attempt += 1

    def _run(self, call: Call[R]) -> R:
        return call.parse(answer_json(self._send(call)))

    def _pages(self, listing: Listing[T]) -> Iterator[T]:
        cursor: str | None = None
        while True:
            items, cursor = self._run(listing.page(cursor))
            yield from items
            if not cursor or not items:
                return

    def _events(self, stream: Stream[T]) -> Iterator[T]:
        r = self._send(stream.call, stream=True)
        try:
            for line in r.iter_lines():
                item = stream.decode(line)
                if item is End.DONE:
                    return
                if item is not None:
                    yield item
        except httpx.TransportError as e:
            raise APIConnectionError(f"the stream broke: {e}") from e
        finally:
            r.close()

    def _bind_one(self, build: Callable[P, Call[R]]) -> Callable[P, R]:
        @functools.wraps(build)
        def method(*args: P.args, **kwargs: P.kwargs) -> R:
            return self._run(build(*args, **kwargs))

        return method
