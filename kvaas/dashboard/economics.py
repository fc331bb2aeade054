"""What the overview derives from this process's recorded request metrics: time to first
token of creates (cold prefills) and attaches, and the engine time a cached token saves."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvaas.metrics import TTFT, TTFT_PREFILL_TOKENS


@dataclass
class TtftStats:
    """One operation's recorded times to first token (seconds) since this process started."""

    count: int
    mean_s: float | None
    p50_s: float | None
    p90_s: float | None
    prefill_tokens: int


def _quantile(buckets: list[tuple[float, float]], count: float, q: float) -> float | None:
    """The ``q`` quantile from cumulative histogram buckets (linear within a bucket)."""
    if count <= 0:
        return None
    rank = q * count
    prev_bound, prev_cum = 0.0, 0.0
    for bound, cum in buckets:
        if cum >= rank:
            if math.isinf(bound):
                return prev_bound
            span = cum - prev_cum
            frac = (rank - prev_cum) / span if span else 1.0
            return prev_bound + (bound - prev_bound) * frac
        prev_bound, prev_cum = bound, cum
    return prev_bound


def ttft_stats(op: str) -> TtftStats:
    """``create`` or ``attach`` times to first token, from ``kvaas_ttft_seconds``."""
    total = count = 0.0
    buckets: list[tuple[float, float]] = []
    for metric in TTFT.collect():
        for s in metric.samples:
            if s.labels.get("op") != op:
                continue
            if s.name.endswith("_sum"):
                total = s.value
            elif s.name.endswith("_count"):
                count = s.value
            elif s.name.endswith("_bucket"):
                buckets.append((float(s.labels["le"]), s.value))
    tokens = 0.0
    for metric in TTFT_PREFILL_TOKENS.collect():
        for s in metric.samples:
            if s.labels.get("op") == op and s.name.endswith("_total"):
                tokens = s.value
    buckets.sort()
    return TtftStats(
        count=int(count),
        mean_s=total / count if count else None,
        p50_s=_quantile(buckets, count, 0.5),
        p90_s=_quantile(buckets, count, 0.9),
        prefill_tokens=int(tokens),
    )


def seconds_per_prefill_token(cold: TtftStats) -> float | None:
    """Engine seconds one prefilled token costs, from cold creates (``None`` before any)."""
    if not cold.count or not cold.prefill_tokens or cold.mean_s is None:
        return None
    return cold.mean_s * cold.count / cold.prefill_tokens
