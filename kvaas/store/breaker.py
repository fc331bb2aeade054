"""A circuit breaker for a remote tier: skip it while down, probe again after a delay.

States: *closed* (calls pass), *open* (calls are refused at once until ``retry_at``), and
*half-open* (one probe call is let through; its outcome closes the breaker or re-opens it with
a doubled delay, capped at ``max_delay``). A probe that never reports back (its task was
cancelled) is forgotten after ``probe_timeout`` so the breaker cannot stick half-open.

Only failures of calls allowed since the breaker last opened lengthen the delay: calls that were
already in flight when it opened (all the calls blocked on a Redis node that died) report one
outage, not one failed probe each. A caller passes the :attr:`CircuitBreaker.generation` it saw
when its call was allowed to :meth:`CircuitBreaker.record_failure`; without it, every failure
counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Tracks one remote dependency's availability. Not thread-safe (one event loop)."""

    def __init__(
        self,
        *,
        base_delay: float = 0.5,
        max_delay: float = 30.0,
        probe_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.probe_timeout = probe_timeout
        self._clock = clock
        self.state: State = "closed"
        self.failures = 0
        self.last_error = ""
        self.retry_at = 0.0
        self._probe_started = 0.0
        self.generation = 0
        """Bumped each time the breaker opens (see :meth:`record_failure`)."""

    def allow(self) -> bool:
        """Whether a call may go out now (in half-open state, only the one probe may)."""
        now = self._clock()
        if self.state == "closed":
            return True
        if self.state == "open" and now >= self.retry_at:
            self.state = "half_open"
            self._probe_started = now
            return True
        if self.state == "half_open" and now - self._probe_started > self.probe_timeout:
            self._probe_started = now
            return True
        return False

    def record_success(self) -> None:
        self.state = "closed"
        self.failures = 0
        self.last_error = ""

    def record_failure(self, error: BaseException | str, generation: int | None = None) -> None:
        """A call failed. ``generation``: :attr:`generation` when the call was allowed. A call
        allowed before the breaker last opened, failing while it is still open or half-open,
        only updates :attr:`last_error` (its failure is the outage already counted); any other
        failure opens the breaker with a doubled delay (the base delay after a success)."""
        self.last_error = str(error) or type(error).__name__
        if generation is not None and generation != self.generation and self.state != "closed":
            return
        self.failures += 1
        delay = min(self.max_delay, self.base_delay * 2 ** (self.failures - 1))
        self.state = "open"
        self.retry_at = self._clock() + delay
        self.generation += 1

    def now(self) -> float:
        """The breaker's clock."""
        return self._clock()

    def seconds_until_retry(self) -> float:
        return max(0.0, self.retry_at - self._clock()) if self.state == "open" else 0.0

    @property
    def is_down(self) -> bool:
        return self.state != "closed"
