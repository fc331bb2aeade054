"""Which engine node a request goes to: the routing policy of the remote engine pool.

Pure: no I/O and no clock of its own (callers pass ``now``), so every rule is unit-testable.
:class:`~kvaas.engine.remote.RemoteEngine` asks :meth:`Router.choose` for each request and tells
:meth:`Router.record` where a request with a transfer plan succeeded.

**Load and eligibility.** A node's load is ``(in_flight + 1) / weight`` (weighted
least-connections: a node of weight 2 takes about twice the requests of a node of weight 1). A
node is *eligible* when it is usable (not ejected, not refused), not already tried for this
request, and below its in-flight limit (``max_inflight``; 0: no limit). When usable nodes exist
but all are at their limits, :meth:`Router.choose` answers ``None`` with reason ``full``: the
caller waits for a slot. When no node is usable, it answers the unrefused untried node whose
ejection ends first (reason ``last_try``).

**Policies.** ``least_loaded``: the eligible node of least load. ``round_robin``: eligible
nodes in turn. ``cache_aware`` (the default) adds *affinity*: a request whose plan names chunk
keys prefers the node(s) that served that cache before, since the connector's per-process
memory tier on those nodes holds its chunks (a load promotes them there from the shared tier; a
save writes the shared tier only, so the first attach after a save reads it wherever it goes)
and a load served from the memory tier reads nothing from the shared tiers.

**What the router learns.** After a request with keys succeeds on a node, :meth:`record` maps two
identities to that node: the plan's *last* key (the whole cache, as attached or saved) and its
*first* key (the leading chunk, which caches sharing a prefix share, as do the versions of one
cache). A request looks up its last key first, then its first key. The map is an LRU of at most
``capacity`` identities; each keeps at most ``hot_replicas`` nodes, most recent first. A node
that is ejected is forgotten (:meth:`forget`): a restarted node's memory tier is empty.

**Fallback.** The preferred node is skipped (reason ``fallback``, the least-loaded eligible node
is used and becomes the cache's most recent node) when none of the cache's nodes is eligible
(ejected, refused, tried, at its limit; a cache that is not hot uses the most recent of its
eligible nodes) or when the preferred one is *much busier*: its load is at least ``imbalance``
above the least-loaded eligible node's (default 4: four more requests in flight on nodes of
weight 1). A request found by its first key only (another cache on the same leading chunk: the
node holds part of it) is held to ``prefix_imbalance`` (default 1: it goes there only while that
node is no busier than the least-loaded one by a whole request), so that caches sharing a
popular prefix do not all pile onto one node. A cache
the router never saw goes to the least-loaded node (reason ``least_loaded``).

**Hot caches.** Each identity keeps a decayed arrival count (half-life ``hot_half_life_s``); its
rate is ``count * ln 2 / half_life``. A cache arriving at ``hot_rate_per_s`` or more is *hot*
and is pinned to up to ``hot_replicas`` nodes: a request goes to the least-loaded of its nodes,
or, while it has fewer than ``hot_replicas`` nodes, to the least-loaded eligible node outside
the set when that one is less loaded (reason ``hot_spread``; the node joins the set). A cache
that is not hot uses its most recent eligible node only.

Reasons reported (``kvaas_engine_route_total``): ``affinity``, ``hot_spread``, ``fallback``,
``least_loaded``, ``round_robin``, ``last_try``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

Policy = Literal["cache_aware", "least_loaded", "round_robin"]
POLICIES: tuple[Policy, ...] = ("cache_aware", "least_loaded", "round_robin")
Reason = Literal[
    "affinity", "hot_spread", "fallback", "least_loaded", "round_robin", "last_try", "full"
]


class PoolNode(Protocol):
    """What the router reads of a node (:class:`kvaas.engine.remote.Node` has it)."""

    @property
    def url(self) -> str: ...
    @property
    def inflight(self) -> int: ...
    @property
    def weight(self) -> float: ...
    @property
    def max_inflight(self) -> int: ...
    @property
    def refused(self) -> str | None: ...
    @property
    def ejected_until(self) -> float: ...
    @property
    def ejected(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes (``url`` ``None`` only with reason ``full``) and why."""

    url: str | None
    reason: Reason


@dataclass(slots=True)
class _Entry:
    nodes: list[str] = field(default_factory=list)  # most recent first
    count: float = 0.0  # decayed arrivals
    seen: float = 0.0  # when count was last decayed


def load(node: PoolNode) -> float:
    """The node's load if it took one more request: ``(in_flight + 1) / weight``."""
    return (node.inflight + 1) / max(node.weight, 1e-9)


class Router:
    """The routing policy and what it learned (see the module). Not thread-safe: one event loop
    owns it."""

    def __init__(
        self,
        policy: Policy = "cache_aware",
        *,
        capacity: int = 100_000,
        imbalance: float = 4.0,
        hot_rate_per_s: float = 2.0,
        hot_replicas: int = 2,
        hot_half_life_s: float = 30.0,
        prefix_imbalance: float = 1.0,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose one of {POLICIES}")
        if capacity < 1 or hot_replicas < 1 or imbalance <= 0 or hot_half_life_s <= 0:
            raise ValueError("capacity, hot_replicas, imbalance and hot_half_life_s must be > 0")
        self.policy: Policy = policy
        self.capacity = capacity
        self.imbalance = imbalance
        self.prefix_imbalance = prefix_imbalance
        self.hot_rate_per_s = hot_rate_per_s
        self.hot_replicas = hot_replicas
        self.hot_half_life_s = hot_half_life_s
        self._map: OrderedDict[bytes, _Entry] = OrderedDict()
        self._turn = 0

    def __len__(self) -> int:
        return len(self._map)

    # --- what the router knows ------------------------------------------------------------

    @staticmethod
    def identities(keys: Sequence[bytes]) -> list[bytes]:
        """The identities of a plan's keys, most specific first: last key, then first key."""
        if not keys:
            return []
        return [bytes(keys[-1])] if len(keys) == 1 else [bytes(keys[-1]), bytes(keys[0])]

    def _match(self, keys: Sequence[bytes]) -> tuple[_Entry | None, bool]:
        """The entry ``keys`` find, and whether it is the exact cache (last key) rather than
        a shared first chunk."""
        for i, ident in enumerate(self.identities(keys)):
            e = self._map.get(ident)
            if e is not None and e.nodes:
                return e, i == 0
        return None, False

    def _entry(self, keys: Sequence[bytes]) -> _Entry | None:
        return self._match(keys)[0]

    def nodes_for(self, keys: Sequence[bytes]) -> list[str]:
        """The nodes the router would prefer for ``keys``, most recent first."""
        e = self._entry(keys)
        return list(e.nodes) if e is not None else []

    def rate(self, keys: Sequence[bytes], now: float) -> float:
        """The decayed arrival rate (requests per second) of the cache ``keys`` name."""
        e = self._entry(keys)
        if e is None:
            return 0.0
        return self._decayed(e, now) * math.log(2) / self.hot_half_life_s

    def _decayed(self, e: _Entry, now: float) -> float:
        return e.count * 0.5 ** (max(0.0, now - e.seen) / self.hot_half_life_s)

    def _arrive(self, e: _Entry, now: float) -> None:
        e.count = self._decayed(e, now) + 1.0
        e.seen = max(e.seen, now)

    def record(self, keys: Sequence[bytes], url: str, now: float) -> None:
        """A request with ``keys`` succeeded on ``url``: its memory tier holds the chunks."""
        idents = self.identities(keys)
        known = self._entry(keys)
        for ident in idents:
            e = self._map.get(ident)
            if e is None:
                e = _Entry(count=known.count if known else 0.0, seen=known.seen if known else now)
                self._map[ident] = e
            else:
                self._map.move_to_end(ident)
            if url in e.nodes:
                e.nodes.remove(url)
            e.nodes.insert(0, url)
            del e.nodes[self.hot_replicas :]
        while len(self._map) > self.capacity:
            self._map.popitem(last=False)

    def forget(self, url: str) -> None:
        """``url`` lost its memory tier (ejected, restarted): prefer it for nothing."""
        for ident in [i for i, e in self._map.items() if url in e.nodes]:
            e = self._map[ident]
            e.nodes.remove(url)
            if not e.nodes:
                del self._map[ident]

    # --- choosing ---------------------------------------------------------------------------

    def choose(
        self,
        nodes: Sequence[PoolNode],
        now: float,
        *,
        keys: Sequence[bytes] = (),
        tried: frozenset[str] | set[str] = frozenset(),
    ) -> Decision | None:
        """Where the request goes (see the module). ``keys``: its plan's chunk keys (empty:
        no plan). ``tried``: nodes this request already failed to reach. ``None``: no node is
        left at all (every one refused or tried)."""
        fresh = [n for n in nodes if n.url not in tried and n.refused is None]
        usable = [n for n in fresh if not n.ejected and now >= n.ejected_until]
        if not usable:
            if not fresh:
                return None
            return Decision(min(fresh, key=lambda n: n.ejected_until).url, "last_try")
        eligible = [n for n in usable if n.max_inflight <= 0 or n.inflight < n.max_inflight]
        if not eligible:
            return Decision(None, "full")
        if self.policy == "round_robin":
            pick = eligible[self._turn % len(eligible)]
            self._turn += 1
            return Decision(pick.url, "round_robin")
        least = min(eligible, key=load)
        if self.policy == "least_loaded" or not keys:
            return Decision(least.url, "least_loaded")
        e, exact = self._match(keys)
        if e is None:
            return Decision(least.url, "least_loaded")
        if not tried:
            self._arrive(e, now)
        hot = self._decayed(e, now) * math.log(2) / self.hot_half_life_s >= self.hot_rate_per_s
        by_url = {n.url: n for n in eligible}
        held = [by_url[u] for u in e.nodes if u in by_url]
        pinned = held if hot else held[:1]
        if not pinned:
            return Decision(least.url, "fallback")
        best = min(pinned, key=load)
        if load(best) - load(least) >= (self.imbalance if exact else self.prefix_imbalance):
            return Decision(least.url, "fallback")
        if hot and len(e.nodes) < self.hot_replicas and load(least) < load(best):
            return Decision(least.url, "hot_spread")
        return Decision(best.url, "affinity")
