"""The routing policy of the remote engine pool (kvaas.engine.routing), rule by rule: weights
and in-flight limits, affinity learned from where a cache's requests succeeded, fallback when
the cache's node is ejected, tried, full or much busier, hot caches pinned to more nodes, the
bounded map, and the policies that ignore caches."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kvaas.engine.routing import Router


@dataclass
class N:
    url: str
    inflight: int = 0
    weight: float = 1.0
    max_inflight: int = 0
    refused: str | None = None
    ejected_until: float = 0.0
    ejected: bool = False


def keys(cache: int, n: int = 3) -> list[bytes]:
    """The ``n`` chunk keys of cache number ``cache`` (no two caches share a key)."""
    return [bytes([cache % 256, i]) * 16 for i in range(n)]


def test_least_loaded_follows_weights() -> None:
    a, b = N("a", weight=2.0), N("b")
    r = Router("least_loaded")
    got = []
    for _ in range(6):
        d = r.choose([a, b], 0.0)
        assert d is not None and d.reason == "least_loaded"
        node = a if d.url == "a" else b
        node.inflight += 1
        got.append(d.url)
    assert got.count("a") == 4 and got.count("b") == 2


def test_in_flight_limit_skips_a_full_node_and_says_full_when_all_are() -> None:
    a, b = N("a", inflight=2, max_inflight=2), N("b", inflight=5, max_inflight=6)
    r = Router("least_loaded")
    assert r.choose([a, b], 0.0) == r.choose([b], 0.0)
    d = r.choose([a, b], 0.0)
    assert d is not None and d.url == "b"
    b.inflight = 6
    d = r.choose([a, b], 0.0)
    assert d is not None and d.url is None and d.reason == "full"


def test_attach_goes_where_the_cache_was_saved_even_when_a_bit_busier() -> None:
    a, b = N("a"), N("b", inflight=2)
    r = Router()
    r.record(keys(1), "b", 0.0)
    d = r.choose([a, b], 1.0, keys=keys(1))
    assert d is not None and (d.url, d.reason) == ("b", "affinity")
    d = r.choose([a, b], 1.0, keys=keys(2))  # never seen: least loaded
    assert d is not None and (d.url, d.reason) == ("a", "least_loaded")


def test_least_loaded_policy_ignores_where_the_cache_is() -> None:
    a, b = N("a"), N("b", inflight=2)
    r = Router("least_loaded")
    r.record(keys(1), "b", 0.0)
    d = r.choose([a, b], 1.0, keys=keys(1))
    assert d is not None and d.url == "a"


def test_round_robin_takes_nodes_in_turn() -> None:
    nodes = [N("a"), N("b"), N("c")]
    r = Router("round_robin")
    r.record(keys(1), "a", 0.0)
    urls = []
    for _ in range(6):
        d = r.choose(nodes, 0.0, keys=keys(1))
        assert d is not None and d.reason == "round_robin"
        urls.append(d.url)
    assert urls == ["a", "b", "c", "a", "b", "c"]


def test_much_busier_preferred_node_falls_back_and_the_cache_moves() -> None:
    a, b = N("a"), N("b", inflight=4)
    r = Router(imbalance=4.0)
    r.record(keys(1), "b", 0.0)
    d = r.choose([a, b], 1.0, keys=keys(1))
    assert d is not None and (d.url, d.reason) == ("a", "fallback")
    r.record(keys(1), "a", 1.0)
    b.inflight = 0
    a.inflight = 1  # now a holds it and is a little busier: still a
    d = r.choose([a, b], 2.0, keys=keys(1))
    assert d is not None and (d.url, d.reason) == ("a", "affinity")


@pytest.mark.parametrize("why", ["ejected", "refused", "tried", "full"])
def test_unavailable_preferred_node_falls_back_to_the_least_loaded(why: str) -> None:
    a, b, c = N("a", inflight=3), N("b"), N("c", inflight=1)
    tried: set[str] = set()
    if why == "ejected":
        b.ejected_until = 10.0
    elif why == "refused":
        b.refused = "other weights"
    elif why == "tried":
        tried.add("b")
    else:
        b.max_inflight, b.inflight = 1, 1
    r = Router()
    r.record(keys(7), "b", 0.0)
    d = r.choose([a, b, c], 1.0, keys=keys(7), tried=tried)
    assert d is not None and (d.url, d.reason) == ("c", "fallback")


def test_no_usable_node_is_a_last_try_on_the_one_back_first() -> None:
    a, b = N("a", ejected_until=9.0), N("b", ejected_until=5.0)
    r = Router()
    d = r.choose([a, b], 1.0, keys=keys(1))
    assert d is not None and (d.url, d.reason) == ("b", "last_try")
    assert r.choose([a, b], 1.0, tried={"a", "b"}) is None


def test_a_new_version_of_a_cache_follows_its_first_chunk_while_not_busier() -> None:
    a, b = N("a"), N("b")
    r = Router(imbalance=4.0, prefix_imbalance=1.0)
    r.record(keys(101, 2), "b", 0.0)
    longer = [*keys(101, 2), b"\x09" * 32]  # extended: same leading chunks, new last one
    other = [keys(101, 2)[0], b"\x08" * 32]  # another cache on the same first chunk
    for k in (longer, other):
        d = r.choose([a, b], 1.0, keys=k)
        assert d is not None and (d.url, d.reason) == ("b", "affinity")
    # a shared first chunk is worth less than the cache itself: one more request in flight
    # sends it elsewhere, while the exact cache stays up to the imbalance threshold
    b.inflight = 1
    d = r.choose([a, b], 2.0, keys=other)
    assert d is not None and (d.url, d.reason) == ("a", "fallback")
    b.inflight = 3
    d = r.choose([a, b], 2.0, keys=keys(101, 2))
    assert d is not None and (d.url, d.reason) == ("b", "affinity")


def test_a_hot_cache_is_pinned_to_a_second_node_and_a_cold_one_is_not() -> None:
    a, b = N("a", inflight=1), N("b")
    r = Router(hot_rate_per_s=2.0, hot_replicas=2, hot_half_life_s=10.0)
    r.record(keys(1), "a", 0.0)
    r.record(keys(2), "a", 0.0)
    # cold: one request every 10 s, always on its node although the other is idle
    for t in range(1, 5):
        d = r.choose([a, b], 10.0 * t, keys=keys(2))
        assert d is not None and (d.url, d.reason) == ("a", "affinity")
    # hot: 10 requests per second for 6 s
    reasons = []
    for i in range(60):
        now = 100.0 + i / 10
        d = r.choose([a, b], now, keys=keys(1))
        assert d is not None and d.url is not None
        reasons.append(d.reason)
        r.record(keys(1), d.url, now)
    assert r.rate(keys(1), 106.0) >= 2.0
    assert "hot_spread" in reasons
    assert sorted(r.nodes_for(keys(1))) == ["a", "b"]
    # pinned to both: the less loaded of the two, by affinity
    a.inflight, b.inflight = 0, 2
    d = r.choose([a, b], 106.0, keys=keys(1))
    assert d is not None and (d.url, d.reason) == ("a", "affinity")
    a.inflight, b.inflight = 2, 0
    d = r.choose([a, b], 106.1, keys=keys(1))
    assert d is not None and (d.url, d.reason) == ("b", "affinity")


def test_the_map_is_bounded_and_forgets_the_least_recent() -> None:
    r = Router(capacity=10)
    for c in range(20):
        r.record(keys(c, 1), "a", float(c))
    assert len(r) == 10
    assert r.nodes_for(keys(0, 1)) == [] and r.nodes_for(keys(19, 1)) == ["a"]


def test_an_ejected_node_is_forgotten() -> None:
    r = Router()
    r.record(keys(1), "a", 0.0)
    r.record(keys(2), "b", 0.0)
    r.forget("a")
    assert r.nodes_for(keys(1)) == [] and r.nodes_for(keys(2)) == ["b"]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        Router("random")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Router(capacity=0)
