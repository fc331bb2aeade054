"""A circuit breaker for a remote tier: skip it while down, probe again after a delay.

States: *closed* (calls pass), *open* (calls are refused at once until ``retry_at``), and
*half-open* (one probe call is let through; its outcome closes the breaker or re-opens it with
a doubled delay, capped at ``max_delay``). A probe that never reports back (its task was
cancelled) is forgotten after ``probe_timeout`` so the breaker cannot stick half-open.
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

    def record_failure(self, error: BaseException | str) -> None:
        self.failures += 1
        self.last_error = str(error) or type(error).__name__
        delay = min(self.max_delay, self.base_delay * 2 ** (self.failures - 1))
        self.state = "open"
        self.retry_at = self._clock() + delay

    def seconds_until_retry(self) -> float:
        return max(0.0, self.retry_at - self._clock()) if self.state == "open" else 0.0

    @property
    def is_down(self) -> bool:
        return self.state != "closed"
