"""How vLLM's processes wait on their shared-memory queues: spin less, never sleep long.

vLLM's engine core and its workers pass each step's input and output through shared-memory
ring buffers (``vllm.distributed.device_communicators.shm_broadcast``). Two things in how a
reader waits there cost this service dearly, and :func:`install` changes both:

- **Spinning.** A reader that has read within the last ``SpinCondition.busy_loop_s`` (1 s,
  fixed in vLLM) polls the buffer in a ``sched_yield`` loop. With cores to spare that saves a
  socket wake-up per step; on a CPU engine it costs a core: the engine core spins through every
  forward pass, an idle worker for a second after each step, on the cores the forward pass, the
  gateway and its clients need. The window is capped at ``KVAAS_ENGINE_IPC_SPIN_SECONDS`` (the
  gateway's ``engine_ipc_spin_seconds``, exported to the engine's processes by the engines that
  start vLLM). Unset or blank: 0 on a CPU platform, vLLM's own window elsewhere.
- **Lost wake-ups.** Past the window the reader sleeps on a zmq socket the writer signals
  after each write, for up to 5 s (vLLM's recheck interval). That signal is lossy (a PUB socket
  with a send high-water mark of 1 drops a signal sent while the previous one is still in
  flight, as with two writes in quick succession), and a lost one held a request for the rest
  of those 5 s: measured on the in-process engine, with the window at 0 every prefix-cache hit
  took 5.03 s; with vLLM's 1 s window, requests after an idle second took up to 3.8 s. Here a
  sleeping reader looks at the buffer again after :func:`poll_bound_ms` (5 % of its idle time,
  1 to 50 ms), so a lost signal costs at most that, and an idle reader wakes a few dozen times a
  second at most.

vLLM loads :func:`install` in every one of its processes as a general plugin (the
``vllm.general_plugins`` entry point of this package), before any queue is made. The patch is
made only where ``SpinCondition`` has the shape it was written against (``wait(self,
timeout_ms)``, a ``busy_loop_s`` window, a ``last_read`` time); otherwise vLLM's own is kept and
a warning logged.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)

#: the environment variable the engine's processes read the window from (seconds)
SPIN_ENV = "KVAAS_ENGINE_IPC_SPIN_SECONDS"
_PATCHED = "_kvaas_spin_cap"
#: a sleeping reader's socket wait: a share of its idle time, within these bounds
POLL_FRACTION = 0.05
POLL_MIN_MS = 1
POLL_MAX_MS = 50


def spin_window(raw: str | None, cpu: bool) -> float | None:
    """The cap, in seconds, that ``raw`` (the environment's value) asks for; ``None``: keep
    vLLM's own. ``ValueError`` for a value that is not a finite number >= 0."""
    text = (raw or "").strip()
    if not text:
        return 0.0 if cpu else None
    value = float(text)
    if not (value >= 0 and value != float("inf")):
        raise ValueError(f"{SPIN_ENV} must be a finite number of seconds >= 0, got {raw!r}")
    return value


def poll_bound_ms(idle_s: float) -> int:
    """How long a reader idle for ``idle_s`` seconds sleeps on its socket before it looks at
    the buffer again: 5 % of the idle time, between 1 and 50 ms."""
    return int(min(POLL_MAX_MS, max(POLL_MIN_MS, idle_s * 1000 * POLL_FRACTION)))


def capped_wait(original: Any, cap: float | None) -> Any:
    """``SpinCondition.wait`` that spins for at most ``cap`` seconds after the last read
    (``None``: vLLM's window), then sleeps on the socket for at most :func:`poll_bound_ms`
    before the caller looks at the buffer again."""

    def wait(self: Any, timeout_ms: int | None = None) -> None:
        if cap is not None and self.busy_loop_s > cap:
            self.busy_loop_s = cap
        bound = poll_bound_ms(time.monotonic() - self.last_read)
        return original(self, bound if timeout_ms is None else min(timeout_ms, bound))

    setattr(wait, _PATCHED, cap)
    wait.__doc__ = original.__doc__
    return wait


def _known_shape(cls: Any, wait: Any) -> bool:
    """``wait(self, timeout_ms)``, an ``__init__`` taking ``busy_loop_s`` and a
    ``record_read`` (which keeps ``last_read``)."""
    try:
        waits = list(inspect.signature(wait).parameters)
        inits = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False
    return (
        waits == ["self", "timeout_ms"]
        and "busy_loop_s" in inits
        and callable(getattr(cls, "record_read", None))
    )


def install() -> None:
    """Change how every shared-memory queue reader of this process waits, as the module says
    (vLLM general plugin entry point; safe to call more than once)."""
    try:
        from vllm.distributed.device_communicators import shm_broadcast
        from vllm.platforms import current_platform
    except ImportError:  # no vLLM in this environment: nothing to patch
        return
    cap = spin_window(os.environ.get(SPIN_ENV), cpu=current_platform.is_cpu())
    cls = getattr(shm_broadcast, "SpinCondition", None)
    wait = getattr(cls, "wait", None)
    original = getattr(wait, "__wrapped__", wait)
    if cls is None or original is None or not _known_shape(cls, original):
        log.warning("vLLM's SpinCondition is not the one known: its queues spin as vLLM sets")
        return
    patched = capped_wait(original, cap)
    patched.__wrapped__ = original
    setattr(cls, "wait", patched)  # noqa: B010 (a class of vLLM's, typed Any here)
