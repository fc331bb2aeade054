"""Exact storage integration: random cache timelines against a second-by-second brute force."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from kvaas.metering.storage import CacheState, Change, build_segments, integrate

CLASSES = ("hot", "standard", "cold")
HORIZON = 400  # seconds of timeline; periods cut it at random boundaries


@dataclass(frozen=True)
class Op:
    cache: int
    at: int
    kind: str  # create | extend | vdelete (a version deleted: smaller) | class | delete | expire
    tokens: int
    cls: str


ops = st.lists(
    st.builds(
        Op,
        cache=st.integers(0, 3),
        at=st.integers(0, HORIZON),
        kind=st.sampled_from(["create", "extend", "vdelete", "class", "delete", "expire"]),
        tokens=st.integers(1, 5000),
        cls=st.sampled_from(CLASSES),
    ),
    max_size=25,
)


def to_changes(timeline: list[Op]) -> tuple[list[Change], dict[str, int]]:
    """Lifecycle changes as the hooks record them; expiries also set the cache's cap."""
    changes: list[Change] = []
    caps: dict[str, int] = {}
    live: dict[int, CacheState] = {}
    for seq, op in enumerate(sorted(timeline, key=lambda o: o.at)):
        cid = f"c{op.cache}"
        state = live.get(op.cache)
        if op.kind == "create" and state is None:
            new = CacheState(op.tokens, op.cls, (("redis", op.tokens * 3),))
        elif op.kind == "extend" and state is not None:
            new = CacheState(state.tokens + op.tokens, state.storage_class, state.bytes_by_tier)
        elif op.kind == "vdelete" and state is not None and state.tokens > op.tokens:
            # the latest version deleted: the cache shrinks back (a ``resized`` event)
            new = CacheState(state.tokens - op.tokens, state.storage_class, state.bytes_by_tier)
        elif op.kind == "class" and state is not None:
            new = CacheState(state.tokens, op.cls, state.bytes_by_tier)
        elif op.kind in ("delete", "expire") and state is not None:
            changes.append(Change(cid, op.at, seq, None))
            live.pop(op.cache)
            continue
        else:
            continue
        live[op.cache] = new
        changes.append(Change(cid, op.at, seq, new))
    return changes, caps


def brute_force(changes: list[Change], caps: dict[str, int], start: int, end: int) -> dict:
    """Σ over every second t in [start, end) of each live cache's tokens, per class."""
    out = dict.fromkeys(CLASSES, 0)
    by_cache: dict[str, list[Change]] = {}
    for c in changes:
        by_cache.setdefault(c.cache_id, []).append(c)
    for t in range(start, end):
        for cid, cs in by_cache.items():
            state = None
            dead = False
            for c in sorted(cs, key=lambda c: (c.at, c.seq)):
                if c.at > t or dead:
                    break
                if c.state is None:
                    dead, state = True, None
                else:
                    state = c.state
            if state is not None and not (cid in caps and t >= caps[cid]):
                out[state.storage_class] += state.tokens
    return out


@settings(max_examples=300, deadline=None)
@given(
    timeline=ops,
    cuts=st.lists(st.integers(0, HORIZON + 50), min_size=1, max_size=4),
    cap=st.one_of(st.none(), st.integers(0, HORIZON + 50)),
)
def test_integration_equals_brute_force(
    timeline: list[Op], cuts: list[int], cap: int | None
) -> None:
    changes, caps = to_changes(timeline)
    if cap is not None:
        caps = {"c0": cap}  # c0 expires at `cap` unless it ended before (the cache row's expiry)
    segments = build_segments(changes, caps)
    bounds = sorted({0, HORIZON + 60, *cuts})
    total = dict.fromkeys(CLASSES, 0)
    for lo, hi in itertools.pairwise(bounds):
        got = integrate(segments, lo, hi).token_seconds
        assert got == brute_force(changes, caps, lo, hi)
        for k in CLASSES:
            total[k] += got[k]
    # periods add up exactly to the whole timeline
    assert total == integrate(segments, 0, HORIZON + 60).token_seconds


def test_boundary_example() -> None:
    """A cache of 1000 tokens from 50 to 250, standard then cold from 150; periods [0,100),
    [100,200), [200,300)."""
    changes = [
        Change("a", 50, 1, CacheState(1000, "standard")),
        Change("a", 150, 2, CacheState(1000, "cold")),
        Change("a", 250, 3, None),
    ]
    seg = build_segments(changes)
    assert integrate(seg, 0, 100).token_seconds == {"hot": 0, "standard": 50_000, "cold": 0}
    assert integrate(seg, 100, 200).token_seconds == {"hot": 0, "standard": 50_000, "cold": 50_000}
    assert integrate(seg, 200, 300).token_seconds == {"hot": 0, "standard": 0, "cold": 50_000}


def test_ended_is_terminal_and_open_cache_stops_at_cap() -> None:
    changes = [
        Change("a", 10, 1, CacheState(7, "hot")),
        Change("a", 20, 2, None),
        Change("a", 30, 3, CacheState(9, "hot")),  # after the end: ignored
        Change("b", 0, 4, CacheState(2, "cold")),
    ]
    assert integrate(build_segments(changes), 0, 100).token_seconds["hot"] == 70
    # the caches' expiries cap them, ended or not (a late expiry still stops at expires_at)
    seg = build_segments(changes, {"b": 40, "a": 15})
    assert integrate(seg, 0, 100).token_seconds == {"hot": 35, "standard": 0, "cold": 80}
