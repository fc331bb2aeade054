"""How long vLLM's processes spin on their shared-memory queues before they sleep.

vLLM's engine core and its workers pass each step's input and output through shared-memory
ring buffers (``vllm.distributed.device_communicators.shm_broadcast``). A reader that has read
within the last ``SpinCondition.busy_loop_s`` (1 s, fixed in vLLM) waits for the next message by
polling the buffer in a ``sched_yield`` loop instead of sleeping on the queue's notification
socket. With cores to spare that saves a socket wake-up (tens of microseconds) per step. On a
CPU engine it costs a core: the engine core spins for the whole of every forward pass, and an
idle worker for a second after each step, on the cores the worker's forward pass, the gateway
and its clients need.

:func:`install` caps that window at ``KVAAS_ENGINE_IPC_SPIN_SECONDS`` (the gateway's
``engine_ipc_spin_seconds``, exported to the engine's processes by the engines that start
vLLM). Unset or blank: 0 on a CPU platform, vLLM's own window elsewhere. vLLM loads it in every
one of its processes as a general plugin (the ``vllm.general_plugins`` entry point of this
package), before any queue is made. The contract it keeps is vLLM's: a reader past the window
sleeps on the notification socket, which every write signals, so no message waits longer than
a wake-up. The patch is made only where ``SpinCondition`` has the shape it was written against
(``wait(self, timeout_ms)`` and a ``busy_loop_s`` window); otherwise vLLM's own is kept and a
warning logged.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

#: the environment variable the engine's processes read the window from (seconds)
SPIN_ENV = "KVAAS_ENGINE_IPC_SPIN_SECONDS"
_PATCHED = "_kvaas_spin_cap"


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


def capped_wait(original: Any, cap: float) -> Any:
    """``SpinCondition.wait`` that spins for at most ``cap`` seconds after the last read."""

    def wait(self: Any, timeout_ms: int | None = None) -> None:
        if self.busy_loop_s > cap:
            self.busy_loop_s = cap
        return original(self, timeout_ms)

    setattr(wait, _PATCHED, cap)
    wait.__doc__ = original.__doc__
    return wait


def _known_shape(cls: Any, wait: Any) -> bool:
    """``wait(self, timeout_ms)`` and an ``__init__`` taking ``busy_loop_s``."""
    try:
        waits = list(inspect.signature(wait).parameters)
        inits = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False
    return waits == ["self", "timeout_ms"] and "busy_loop_s" in inits


def install() -> None:
    """Cap the spin window of every shared-memory queue reader of this process (vLLM general
    plugin entry point; safe to call more than once)."""
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
    if cap is None:
        setattr(cls, "wait", original)  # noqa: B010 (a class of vLLM's, typed Any here)
        return
    patched = capped_wait(original, cap)
    patched.__wrapped__ = original
    setattr(cls, "wait", patched)  # noqa: B010
