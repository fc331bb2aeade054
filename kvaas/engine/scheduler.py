"""The engine's step scheduler: a tenant's lone request is not slowed by another's bulk prefill.

vLLM batches every running request into each step, so on an engine whose compute the requests
of a step share (a CPU, or a GPU near saturation), a neighbour's long prefill lengthens every
step of a short request beside it: one 1,024-token prefill of the tiny model takes ~0.3 s on
this project's CPU test machine, against ~25 ms for an attach. The gateway's fair gate
(:mod:`kvaas.services.fairness`) bounds how *many* requests each tenant runs; this scheduler
decides, inside each step, *whose prefill tokens* run, from the priority the gate gives each
request when it grants its slot (:mod:`kvaas.engine.priorities`):

- ``INTERACTIVE`` (0): the tenant's only request in the gateway (nothing else of it running
  or queued);
- ``SHARED`` (1): one of several of its tenant's requests, granted while another tenant was
  active: bulk work beside someone else's;
- ``ALONE`` (2): bulk work of a tenant alone on the engine.

Rules, applied at every step (vLLM's ``priority`` policy orders the waiting queue by the same
number, and preempts the highest number first when KV blocks run out):

1. While an interactive request is running or waiting, ``SHARED`` requests that still have
   prompt tokens to compute (waiting, or running mid-prefill) are held back: the interactive
   request's steps carry no bulk prefill. Their decode steps still run (one token each).
2. A held request is never held for more than ``max_hold_s`` since it last computed: it then
   runs one step, so a stream of interactive requests slows bulk work but cannot stop it.
3. While any ``SHARED`` prefill may run, a step computes at most ``bulk_step_tokens`` tokens in
   all, and no more than fit in ``bulk_step_ms`` at the speed the engine has shown (never
   fewer than :data:`MIN_BULK_STEP_TOKENS`), so an interactive request that arrives waits for
   one short step, never for a whole long prefill. ``ALONE`` work is never capped (nobody is
   waiting for the engine), but see rule 4.
4. A request keeps the priority it was granted with, and ``ALONE`` work granted before another
   tenant arrived is still running when that tenant's first request comes. An interactive
   request that arrived *after* an ``ALONE`` request is another tenant's (a tenant with
   requests in flight never has an interactive one), so while it runs or waits, every
   ``ALONE`` request that arrived before it is bulk work beside another tenant's: held and
   capped as ``SHARED`` (rules 1-3).
5. After the last interactive request ends, rules 1-4 go on for ``interactive_grace_ms`` as if
   it still ran: its tenant's next request, from a client that sends one after another, comes
   within tens of milliseconds (the answer's way back, the client, the gateway's work: more
   than 20 ms under load on this project's 2-core test machine, hence the default of 50), and
   would otherwise find a bulk step begun in that gap and wait for all of it. While only held work
   is left, a step computes nothing and the scheduler waits 1 ms before the engine asks again
   (no spinning). The price: bulk work idles up to the grace once per interactive request
   that has no successor; rule 2 still bounds every hold.

Why a time as well as a token count: what a step of 128 tokens costs differs by two orders of
magnitude between devices (a few milliseconds on a GPU, ~27 ms for the tiny model on this
project's 2-core CPU test machine), and the wait of an arriving request is a time. The
scheduler times each step it hands out, from when it could start running (the later of its
scheduling and the end of the step before: right for vLLM's synchronous and asynchronous
schedulers) to its output, and keeps a moving average of the seconds per token of steps of at
least :data:`MIN_BULK_STEP_TOKENS` tokens. The cap is then ``bulk_step_ms`` divided by it: each
capped step's time feeds the average, so the cap settles where a step takes ``bulk_step_ms``
(the fixed cost of a step makes small steps dearer per token, which the average sees). A device
fast enough to run ``bulk_step_tokens`` within the time keeps that cap, unchanged.

Configuration (vLLM's ``additional_config``, key ``"kvaas_scheduler"``): ``bulk_step_tokens``
(default 128; 0 disables rule 3), ``bulk_step_ms`` (default 5; 0: the token cap alone),
``max_hold_s`` (default 0.5; 0 disables rules 1-2) and ``interactive_grace_ms`` (default 50; 0
disables rule 5). The gateway passes them from ``KVAAS_ENGINE_BULK_STEP_TOKENS``,
``KVAAS_ENGINE_BULK_STEP_MS``, ``KVAAS_ENGINE_BULK_MAX_HOLD_SECONDS`` and
``KVAAS_ENGINE_INTERACTIVE_GRACE_MS``, and selects the scheduler with
``scheduler_cls="kvaas.engine.scheduler.fair_scheduler"`` and ``scheduling_policy="priority"``
(in process and on the command line of ``vllm serve`` nodes).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from kvaas.engine.priorities import (
    ALONE,
    CONFIG_KEY,
    DEFAULT_BULK_STEP_MS,
    DEFAULT_BULK_STEP_TOKENS,
    DEFAULT_INTERACTIVE_GRACE_MS,
    DEFAULT_MAX_HOLD_S,
    INTERACTIVE,
    SHARED,
)

__all__ = ["ALONE", "INTERACTIVE", "MIN_BULK_STEP_TOKENS", "SHARED", "fair_scheduler"]

#: the smallest cap the step time may set (one KV block of the usual size), and the fewest
#: tokens a step must compute for its time to count toward the seconds per token
MIN_BULK_STEP_TOKENS = 16
#: weight of the newest step in the moving average of seconds per token
_STEP_COST_WEIGHT = 0.2
#: how long a step that computes nothing, while only held work is left, waits (rule 5)
_IDLE_STEP_WAIT_S = 0.001
#: steps handed out whose output has not come back yet, beyond which the oldest are forgotten
#: (vLLM keeps at most a few in flight)
_MAX_PENDING_STEPS = 8

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request


def _prefilling(r: Request) -> bool:
    return r.num_computed_tokens < r.num_prompt_tokens


class _TenantFair:
    """The rules of the module, over vLLM's scheduler (synchronous or asynchronous)."""

    # provided by vLLM's Scheduler
    running: list[Request]
    waiting: Any
    max_num_scheduled_tokens: int
    vllm_config: VllmConfig

    def _fair_init(self) -> None:
        extra = self.vllm_config.additional_config
        conf = extra.get(CONFIG_KEY, {}) if isinstance(extra, dict) else {}
        self.bulk_step_tokens = int(conf.get("bulk_step_tokens", DEFAULT_BULK_STEP_TOKENS))
        self.max_hold_s = float(conf.get("max_hold_s", DEFAULT_MAX_HOLD_S))
        self.bulk_step_s = float(conf.get("bulk_step_ms", DEFAULT_BULK_STEP_MS)) / 1000
        grace_ms = float(conf.get("interactive_grace_ms", DEFAULT_INTERACTIVE_GRACE_MS))
        self.interactive_grace_s = grace_ms / 1000
        #: (when an interactive request was last running or waiting, its arrival), for rule 5
        self._last_interactive: tuple[float, float] | None = None
        #: moving average of a step's seconds per token (``None`` until a step was timed)
        self.step_s_per_token: float | None = None
        #: id of each step handed out -> (when it was handed out, its tokens)
        self._pending: dict[int, tuple[float, int]] = {}
        #: when the last step's output came back
        self._last_done = 0.0
        #: request id -> when it last computed tokens (or was first seen), for rule 2
        self._progress: dict[str, float] = {}
        #: steps in which at least one request was held back (observability and tests)
        self.held_steps = 0

    def _interactive_since(self, now: float) -> tuple[float | None, bool]:
        """Arrival of the latest interactive request running or waiting, or within its grace
        (rule 5; ``None``: none), and whether it is the grace's."""
        times = [r.arrival_time for r in self._all() if r.priority == INTERACTIVE]
        if times:
            self._last_interactive = (now, max(times))
            return self._last_interactive[1], False
        last = self._last_interactive
        if last is not None and now - last[0] < self.interactive_grace_s:
            return last[1], True
        return None, False

    @staticmethod
    def _bulk(r: Request, interactive_since: float | None) -> bool:
        """Whether ``r`` is bulk work beside another tenant's (see rule 4)."""
        if r.priority == SHARED:
            return True
        return (
            r.priority == ALONE
            and interactive_since is not None
            and r.arrival_time < interactive_since
        )

    def _held(
        self, now: float, interactive_since: float | None
    ) -> tuple[list[Request], list[Request]]:
        """The running and waiting bulk requests to hold back this step (rules 1-2, 4)."""
        if self.max_hold_s <= 0 or interactive_since is None:
            return [], []

        def hold(r: Request) -> bool:
            since = self._progress.setdefault(r.request_id, now)
            return self._bulk(r, interactive_since) and now - since < self.max_hold_s

        running = [r for r in self.running if _prefilling(r) and hold(r)]
        waiting = [r for r in self.waiting if hold(r)]
        return running, waiting

    def bulk_cap(self) -> int:
        """The most tokens a step computes while ``SHARED`` prefill may run (rule 3; 0: none)."""
        cap = self.bulk_step_tokens
        if cap <= 0 or self.bulk_step_s <= 0 or not self.step_s_per_token:
            return cap
        fit = int(self.bulk_step_s / self.step_s_per_token)
        return min(cap, max(MIN_BULK_STEP_TOKENS, fit))

    def _step_handed_out(self, out: SchedulerOutput) -> None:
        if out.total_num_scheduled_tokens <= 0:
            return
        self._pending[id(out)] = (time.monotonic(), out.total_num_scheduled_tokens)
        while len(self._pending) > _MAX_PENDING_STEPS:
            del self._pending[next(iter(self._pending))]

    def _step_done(self, out: SchedulerOutput) -> None:
        """Times the step whose output came back (see the module's rule 3)."""
        now = time.monotonic()
        handed = self._pending.pop(id(out), None)
        began, self._last_done = max(handed[0] if handed else now, self._last_done), now
        if handed is None or handed[1] < MIN_BULK_STEP_TOKENS:
            return
        per_token = (now - began) / handed[1]
        avg = self.step_s_per_token
        self.step_s_per_token = (
            per_token if avg is None else avg + _STEP_COST_WEIGHT * (per_token - avg)
        )

    def _all(self) -> Iterable[Request]:
        yield from self.running
        yield from self.waiting

    def _fair_schedule(self, schedule: Any, *args: Any, **kwargs: Any) -> SchedulerOutput:
        now = time.monotonic()
        interactive_since, in_grace = self._interactive_since(now)
        held_running, held_waiting = self._held(now, interactive_since)
        held_ids = {r.request_id for r in held_running} | {r.request_id for r in held_waiting}
        bulk_may_run = any(
            self._bulk(r, interactive_since) and r.request_id not in held_ids and _prefilling(r)
            for r in self._all()
        )
        if held_running:
            self.running = [r for r in self.running if r.request_id not in held_ids]
        if held_waiting:
            self.waiting.remove_requests(held_waiting)
        budget = self.max_num_scheduled_tokens
        cap = self.bulk_cap()
        if bulk_may_run and cap > 0:
            self.max_num_scheduled_tokens = min(budget, cap)
        try:
            out: SchedulerOutput = schedule(*args, **kwargs)
        finally:
            self.max_num_scheduled_tokens = budget
            if held_running:
                self.running.extend(held_running)  # the lowest priority: last in line
            for r in held_waiting:
                self.waiting.add_request(r)
        if held_ids:
            self.held_steps += 1
            if in_grace and out.total_num_scheduled_tokens <= 0:
                time.sleep(_IDLE_STEP_WAIT_S)  # nothing to run but held work: no spinning
        self._step_handed_out(out)
        for rid in out.num_scheduled_tokens:
            self._progress[rid] = now
        if len(self._progress) > 2 * (len(self.running) + len(self.waiting)) + 64:
            live = {r.request_id for r in self._all()}
            self._progress = {k: v for k, v in self._progress.items() if k in live}
        return out


class TenantFairScheduler(_TenantFair, Scheduler):
    """vLLM's synchronous scheduler with the rules of :mod:`kvaas.engine.scheduler`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fair_init()

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        return self._fair_schedule(super().schedule, *args, **kwargs)

    def update_from_output(self, scheduler_output: SchedulerOutput, *args: Any, **kw: Any) -> Any:
        self._step_done(scheduler_output)
        return super().update_from_output(scheduler_output, *args, **kw)


class AsyncTenantFairScheduler(_TenantFair, AsyncScheduler):
    """vLLM's asynchronous scheduler with the rules of :mod:`kvaas.engine.scheduler`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fair_init()

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        return self._fair_schedule(super().schedule, *args, **kwargs)

    def update_from_output(self, scheduler_output: SchedulerOutput, *args: Any, **kw: Any) -> Any:
        self._step_done(scheduler_output)
        return super().update_from_output(scheduler_output, *args, **kw)


def fair_scheduler(*args: Any, vllm_config: VllmConfig, **kwargs: Any) -> Scheduler:
    """vLLM's ``scheduler_cls``: the fair scheduler over the base vLLM would pick itself
    (asynchronous when ``async_scheduling`` is on)."""
    cls = (
        AsyncTenantFairScheduler
        if vllm_config.scheduler_config.async_scheduling
        else TenantFairScheduler
    )
    return cls(*args, vllm_config=vllm_config, **kwargs)
