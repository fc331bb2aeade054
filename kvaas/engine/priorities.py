"""Engine request priorities: what the gateway's fair gate tells the engine's step scheduler.

The gate (:class:`kvaas.services.fairness.FairGate`) gives each request a priority when it
grants its slot and sets :data:`ENGINE_PRIORITY` for the block that runs it; the engines read it
when they submit the request (in process: vLLM's ``priority`` argument; remote nodes: the
request body's ``priority``). The scheduler (:mod:`kvaas.engine.scheduler`, which needs vLLM)
acts on it inside every step. This module has no dependency, so the gateway can import it
whether or not vLLM is installed.
"""

from __future__ import annotations

from contextvars import ContextVar

#: a tenant's lone request (nothing else of it running or queued)
INTERACTIVE = 0
#: one of a tenant's several requests, granted while another tenant was active
SHARED = 1
#: work of a tenant alone on the engine
ALONE = 2

#: the priority of the engine request the current block submits (``INTERACTIVE`` unless a
#: fair gate's slot says otherwise)
ENGINE_PRIORITY: ContextVar[int] = ContextVar("kvaas_engine_priority", default=INTERACTIVE)

#: vLLM's ``scheduler_cls`` (resolved by name in the engine core's process)
SCHEDULER_CLS = "kvaas.engine.scheduler.fair_scheduler"
#: ``vllm_config.additional_config`` key of the scheduler's options
CONFIG_KEY = "kvaas_scheduler"
DEFAULT_BULK_STEP_TOKENS = 128
DEFAULT_BULK_STEP_MS = 5.0
DEFAULT_MAX_HOLD_S = 0.5
DEFAULT_INTERACTIVE_GRACE_MS = 50.0


def options(
    bulk_step_tokens: int,
    max_hold_s: float,
    bulk_step_ms: float = DEFAULT_BULK_STEP_MS,
    interactive_grace_ms: float = DEFAULT_INTERACTIVE_GRACE_MS,
) -> dict[str, dict[str, float]]:
    """The ``additional_config`` entry that configures the scheduler."""
    if min(bulk_step_tokens, max_hold_s, bulk_step_ms, interactive_grace_ms) < 0:
        raise ValueError(
            "bulk_step_tokens, max_hold_s, bulk_step_ms and interactive_grace_ms must not be "
            "negative"
        )
    return {
        CONFIG_KEY: {
            "bulk_step_tokens": bulk_step_tokens,
            "max_hold_s": max_hold_s,
            "bulk_step_ms": bulk_step_ms,
            "interactive_grace_ms": interactive_grace_ms,
        }
    }
