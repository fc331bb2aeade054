"""Service-level Prometheus metrics (the store and engine define their own, same registry)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

HTTP_REQUESTS = Counter(
    "kvaas_http_requests_total",
    "HTTP requests handled, by method, route template and status.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "kvaas_http_request_duration_seconds",
    "Time to handle an HTTP request, by method and route template.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
AUTH_FAILURES = Counter(
    "kvaas_auth_failures_total", "Rejected API or admin credentials, by reason.", ["reason"]
)
TTFT = Histogram(
    "kvaas_ttft_seconds",
    "Time to first token inside the engine, by operation: `create` (a cold prefill of the "
    "whole prompt) and `attach` (the cached prefix loaded, the rest prefilled).",
    ["op"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
TTFT_PREFILL_TOKENS = Counter(
    "kvaas_ttft_prefill_tokens_total",
    "Tokens prefilled by the requests `kvaas_ttft_seconds` timed, by operation (seconds per "
    "prefilled token of cold creates price what an attach saves).",
    ["op"],
)


def record_ttft(op: str, ttft_ms: float | None, prefill_tokens: int) -> None:
    """Record one request's time to first token (``op``: ``create`` or ``attach``) and the
    tokens it prefilled; nothing when the engine measured no time."""
    if ttft_ms is None:
        return
    TTFT.labels(op).observe(ttft_ms / 1000.0)
    TTFT_PREFILL_TOKENS.labels(op).inc(max(prefill_tokens, 0))
