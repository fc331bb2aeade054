"""What an endpoint description is, and how a client class turns descriptions into methods.

An endpoint is a function of the method's arguments that returns a description:

- :class:`Call`: one request (method, path, JSON body, query) and how to read its answer;
- :class:`Listing`: a paginated ``GET`` whose pages are followed by ``next_cursor``;
- :class:`Stream`: a request answered with server-sent events, parsed one ``data:`` line at
  a time.

Decorating such a function with :func:`one` (a :class:`Call`) or :func:`many` (a
:class:`Listing` or :class:`Stream`) in the body of
:class:`~kvaas.client.endpoints.Endpoints` makes it a method of both clients, with the
function's signature: the sync :class:`~kvaas.client.KVaaS` runs the description and returns
its result (an iterator for :func:`many`), the async :class:`~kvaas.client.AsyncKVaaS` returns
a coroutine (an async iterator for :func:`many`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, Self, TypeVar, overload
from urllib.parse import quote

from .errors import error_from_body
from .types import APIObject

if TYPE_CHECKING:
    from ._async import AsyncKVaaS
    from ._sync import KVaaS

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T", bound=APIObject)


@dataclass(frozen=True)
class Call(Generic[R]):
    """One logical request: ``parse`` turns the answer's JSON (``None`` for an empty answer)
    into the method's result. A ``POST`` carries ``idempotency_key``, or one the client makes,
    the same on every retry."""

    method: str
    path: str
    parse: Callable[[Any], R]
    json: Any = None
    params: Mapping[str, Any] | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Listing(Generic[T]):
    """``GET path?params`` page by page: each page's ``next_cursor`` is sent back as ``after``
    until a page says ``has_more: false``, has no cursor, or is empty."""

    path: str
    item: type[T]
    params: Mapping[str, Any] = field(default_factory=dict)

    def page(self, cursor: str | None) -> Call[tuple[list[T], str | None]]:
        """The request for the page after ``cursor`` (the first page for ``None``)."""
        return Call("GET", self.path, self._read_page, params={**self.params, "after": cursor})

    def _read_page(self, page: Any) -> tuple[list[T], str | None]:
        data, cursor = page_items(page)
        return [self.item.model_validate(x) for x in data], cursor


class End(Enum):
    """The event that ends a stream (``data: [DONE]``)."""

    DONE = "[DONE]"


@dataclass(frozen=True)
class Stream(Generic[T]):
    """``call`` answered with server-sent events; its ``parse`` reads each ``data:`` line."""

    call: Call[T]

    def decode(self, line: str) -> T | Literal[End.DONE] | None:
        """The item of a ``data:`` line, :attr:`End.DONE` at the end marker, ``None`` for any
        other line; an in-band error event raises its :class:`~kvaas.client.KVaaSError`."""
        if not line.startswith("data:"):
            return None
        data = line[5:].strip()
        if data == End.DONE.value:
            return End.DONE
        event = json.loads(data)
        if isinstance(event, dict) and "error" in event and "choices" not in event:
            raise error_from_body(None, event)
        return self.call.parse(event)


# --- helpers for the descriptions -----------------------------------------------------------------
def seg(value: str | int) -> str:
    """``value`` as one URL path segment."""
    return quote(str(value), safe="")


def body(**fields: Any) -> dict[str, Any]:
    """A request body of the set (not ``None``) ``fields``, then the items of ``extra``."""
    extra = fields.pop("extra", None) or {}
    return {**{k: v for k, v in fields.items() if v is not None}, **extra}


def page_items(page: Any) -> tuple[list[Any], str | None]:
    """The items of a list answer (``{"data": [...], "next_cursor", "has_more"}`` or a bare
    list) and the cursor of the next page (``None``: none)."""
    data = page.get("data", []) if isinstance(page, dict) else page
    cursor = page.get("next_cursor") if isinstance(page, dict) else None
    if isinstance(page, dict) and page.get("has_more") is False:
        cursor = None
    return list(data), cursor


def items_of(cls: type[T]) -> Callable[[Any], list[T]]:
    """A parser of a one-page list answer into ``cls`` objects."""
    return lambda page: [cls.model_validate(x) for x in page_items(page)[0]]


def optional(cls: type[T]) -> Callable[[Any], T | None]:
    """A parser of an answer that may be empty (``204``): ``None`` then."""
    return lambda out: cls.model_validate(out) if out else None


# --- methods from descriptions --------------------------------------------------------------------
class one(Generic[P, R]):
    """A method that runs the :class:`Call` its function describes and returns the result."""

    def __init__(self, build: Callable[P, Call[R]]) -> None:
        self.build = build
        self.__doc__ = build.__doc__

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Self: ...
    @overload
    def __get__(self, obj: KVaaS, owner: type[Any]) -> Callable[P, R]: ...
    @overload
    def __get__(self, obj: AsyncKVaaS, owner: type[Any]) -> Callable[P, Coroutine[Any, Any, R]]: ...
    def __get__(self, obj: Any, owner: type[Any]) -> Any:
        return self if obj is None else obj._bind_one(self.build)


class many(Generic[P, T]):
    """A method that returns an iterator over the :class:`Listing` or :class:`Stream` its
    function describes (the client's ``_pages`` or ``_events``: sync or async iterators);
    nothing is sent before the first item is asked for."""

    def __init__(self, build: Callable[P, Listing[T] | Stream[T]]) -> None:
        self.build = build
        self.__doc__ = build.__doc__

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Self: ...
    @overload
    def __get__(self, obj: KVaaS, owner: type[Any]) -> Callable[P, Iterator[T]]: ...
    @overload
    def __get__(self, obj: AsyncKVaaS, owner: type[Any]) -> Callable[P, AsyncIterator[T]]: ...
    def __get__(self, obj: Any, owner: type[Any]) -> Any:
        if obj is None:
            return self
        build = self.build

        @functools.wraps(build)
        def method(*args: P.args, **kwargs: P.kwargs) -> Any:
            source = build(*args, **kwargs)
            return obj._events(source) if isinstance(source, Stream) else obj._pages(source)

        return method
