"""Per-stage timings of the connector's loads: what one attach spends where.

The stages of one load (the ``stage`` label; ``tier`` names the tier where a stage is per
tier, ``all`` elsewhere):

- ``lookup``: the scheduler's existence check of the plan's chunks (scheduler side);
- ``decoded``: copying the leading chunks the worker holds pre-decoded
  (:mod:`kvaas.connector.decoded`) into its staging buffer, or straight into the request's
  blocks when every chunk of the load is pre-decoded: no fetch, verify or decode;
- ``fetch``: one batched read of the request's chunks from a tier (per tier: memory, redis,
  disk), inside the store's event loop;
- ``verify``: checking each chunk once in the store: opening it when sealed (AES-GCM
  authentication and decryption) and its container checksum;
- ``promote``: copying chunks found below the top tier up (memory tier), when done inline;
- ``store``: the whole store call as the worker waits for it (fetch, decrypt, verify and
  promote plus the hand-off to and from the store's loop thread);
- ``decode``: dequantizing the chunks into the worker's staging buffer;
- ``copy``: writing the staged KV into the request's paged blocks;
- ``load``: the whole load in the worker (``store`` + ``decode`` + ``copy`` + checks).

How the figures travel: the worker runs inside vLLM's engine-core process, the gateway's
``/metrics`` in another. The worker sends each request's figures to the scheduler side with
its per-step worker metadata; the scheduler adds them (and its own ``lookup``) to the
``kvaas`` report that ``request_finished`` returns, which reaches the gateway with the
request's output as ``kv_transfer_params["kvaas"]["load_ms"]`` (milliseconds, keys
``"<stage>"`` or ``"<stage>:<tier>"``). :func:`observe_load_report` records one report in the
:data:`LOAD_STAGE_SECONDS` histogram of the process that calls it (the gateway's). This module
does not import vLLM.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from prometheus_client import Histogram

from kvaas.store.metrics import LATENCY_BUCKETS

#: Key of the per-stage figures in the connector's ``kvaas`` report.
REPORT_KEY = "load_ms"
ALL_TIERS = "all"

LOAD_STAGE_SECONDS = Histogram(
    "kvaas_connector_load_stage_seconds",
    "Time one connector load (attach) spent in a stage: lookup (scheduler), decoded (copies "
    "of pre-decoded chunks), fetch (per tier), verify (decrypt and checksum), promote, store "
    "(the whole store call), decode, copy, load (the whole load in the worker).",
    ["stage", "tier"],
    buckets=LATENCY_BUCKETS,
)


class StageClock:
    """Seconds per stage, accumulated (a stage timed twice adds up). Keys are ``"stage"`` or
    ``"stage:tier"``. Not thread-safe: one clock per load."""

    __slots__ = ("seconds", "timer")

    def __init__(self, timer: Callable[[], float] = time.perf_counter) -> None:
        self.seconds: dict[str, float] = {}
        self.timer = timer  # wall time; a benchmark may time the thread's CPU instead

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        t0 = self.timer()
        try:
            yield
        finally:
            self.add(stage, self.timer() - t0)

    def as_ms(self) -> dict[str, float]:
        """The figures as the report carries them: milliseconds, rounded to 1 µs."""
        return {k: round(v * 1e3, 3) for k, v in self.seconds.items()}


def merge_ms(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    """Two workers' figures for one request (tensor/pipeline parallel ranks load at once):
    the slower rank's figure per stage."""
    out = dict(a)
    for k, v in b.items():
        out[k] = max(v, out.get(k, v))
    return out


def observe_load_report(report: Mapping[str, object]) -> int:
    """Record the per-stage figures of one request's ``kvaas`` report (the connector's
    ``request_finished`` output) in :data:`LOAD_STAGE_SECONDS`; returns how many were
    recorded. A report without figures, or with malformed ones, records nothing and never
    raises. Call it once per finished request."""
    figures = report.get(REPORT_KEY)
    if not isinstance(figures, Mapping):
        return 0
    n = 0
    for key, ms in figures.items():
        if not isinstance(key, str) or isinstance(ms, bool) or not isinstance(ms, int | float):
            continue
        if ms < 0:
            continue
        stage, _, tier = key.partition(":")
        LOAD_STAGE_SECONDS.labels(stage, tier or ALL_TIERS).observe(ms / 1e3)
        n += 1
    return n
