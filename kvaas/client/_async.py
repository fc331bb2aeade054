"""The asynchronous client: the endpoints of :class:`~kvaas.client.endpoints.Endpoints` over an
``httpx.AsyncClient``."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Coroutine
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


class AsyncKVaaS(Endpoints, ClientBase[httpx.AsyncClient]):
    """Asynchronous client: the methods of :class:`~kvaas.client.KVaaS`, awaitable; the
    iterators (:meth:`attach_stream`, :meth:`list_caches`, :meth:`list_tags`) are async
    iterators. Use as an async context manager, or call :meth:`aclose`.

    ``http_client``: an ``httpx.AsyncClient`` to send with (it is left open on :meth:`aclose`);
    the other settings are :class:`~kvaas.client._base.ClientBase`'s."""

    _http_class = httpx.AsyncClient

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncKVaaS:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # transport ------------------------------------------------------------------------------
    async def _send(self, call: Call[Any], *, stream: bool = False) -> httpx.Response:
        """The successful answer to ``call``, retried as the policy says; raises the error
        of an error answer, :class:`APIConnectionError` when no answer came."""
        headers = self._headers(call)
        attempt = 0
        wait: float | None
        while True:
            try:
                r = await self._http.send(self._request(call, headers), stream=stream)
            except httpx.TransportError as e:
                wait = self._wait_after_failure(attempt, e)
            else:
                wait = self._retry_wait(attempt, r)
                if wait is None:
                    if r.status_code >= 400:
                        await r.aread()
                        await r.aclose()
                        raise error_from_response(r)
                    return r
                await r.aclose()
            await asyncio.sleep(wait)
            attempt += 1

    async def _run(self, call: Call[R]) -> R:
        return call.parse(answer_json(await self._send(call)))

    async def _pages(self, listing: Listing[T]) -> AsyncIterator[T]:
        cursor: str | None = None
        while True:
            items, cursor = await self._run(listing.page(cursor))
            for item in items:
                yield item
            if not cursor or not items:
                return

    async def _events(self, stream: Stream[T]) -> AsyncIterator[T]:
        r = await self._send(stream.call, stream=True)
        try:
            async for line in r.aiter_lines():
                item = stream.decode(line)
                if item is End.DONE:
                    return
                if item is not None:
                    yield item
        except httpx.TransportError as e:
            raise APIConnectionError(f"the stream broke: {e}") from e
        finally:
            await r.aclose()

    def _bind_one(self, build: Callable[P, Call[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        @functools.wraps(build)
        async def method(*args: P.args, **kwargs: P.kwargs) -> R:
            return await self._run(build(*args, **kwargs))

        return method
