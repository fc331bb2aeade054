"""The engine's step scheduler (:mod:`kvaas.engine.scheduler`) on vLLM's own scheduler.

Each test builds a real vLLM scheduler for the tiny model (no model runs), adds requests with
the priorities the fair gate gives, and drives steps: it schedules, then feeds back one sampled
token for every request whose prompt is computed, as the engine would. What is asserted is
which tokens each step schedules, the engine's decision, not any time. Every test runs on
vLLM's synchronous and asynchronous scheduler alike.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest
import torch
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from kvaas.engine.priorities import ALONE, INTERACTIVE, SHARED, options
from kvaas.engine.scheduler import (
    MIN_BULK_STEP_TOKENS,
    AsyncTenantFairScheduler,
    TenantFairScheduler,
    fair_scheduler,
)
from kvaas.model_presets.builder import ARTIFACTS
from kvaas.model_presets.presets import PRESETS

BUDGET = 2048
BLOCK = 16
_ids = itertools.count()


def _scheduler(
    *,
    async_scheduling: bool,
    bulk: int = 128,
    hold: float = 30.0,
    policy: str = "priority",
    step_ms: float = 5.0,
    grace_ms: float = 0.0,
) -> Scheduler:
    path = ARTIFACTS / PRESETS["tiny"].dir_name
    model = ModelConfig(
        model=str(path), skip_tokenizer_init=True, dtype="float32", max_model_len=4096
    )
    sched = SchedulerConfig(
        max_num_batched_tokens=BUDGET,
        max_num_seqs=16,
        max_model_len=4096,
        is_encoder_decoder=False,
        policy=policy,  # type: ignore[arg-type]
        async_scheduling=async_scheduling,
    )
    cache = CacheConfig(block_size=BLOCK, cache_dtype="auto", enable_prefix_caching=False)
    cache.num_gpu_blocks = 2000
    config = VllmConfig(
        model_config=model,
        scheduler_config=sched,
        cache_config=cache,
        additional_config=options(bulk, hold, step_ms, grace_ms),
    )
    # this machine's executor turns asynchronous scheduling off; a GPU's keeps it on
    config.scheduler_config.async_scheduling = async_scheduling
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=16, dtype=torch.float32)
    kv = KVCacheConfig(
        num_blocks=2000, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)]
    )
    return fair_scheduler(
        vllm_config=config,
        kv_cache_config=kv,
        structured_output_manager=StructuredOutputManager(config),
        block_size=BLOCK,
    )


def _request(
    s: Scheduler, prompt: int, priority: int, max_tokens: int = 4, arrival: float | None = None
) -> str:
    rid = f"r{next(_ids)}"
    req = Request(
        rid,
        list(range(1, prompt + 1)),
        SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        None,
        priority=priority,
        arrival_time=arrival,
    )
    s.add_request(req)
    return rid


def _step(s: Scheduler, s_per_token: float = 0.0) -> SchedulerOutput:
    """One engine step: schedule, run (``s_per_token``: a device that takes that long per
    token, as a real wait), then one sampled token for each request whose prompt is computed by
    the end of the step."""
    out = s.schedule()
    time.sleep(s_per_token * out.total_num_scheduled_tokens)
    ids = list(out.num_scheduled_tokens)
    sampled = []
    for rid in ids:
        r = s.requests[rid]
        sampled.append([7] if r.num_computed_tokens >= r.num_prompt_tokens else [])
    s.update_from_output(
        out,
        ModelRunnerOutput(
            req_ids=ids,
            req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=sampled,
        ),
    )
    return out


def _until_finished(s: Scheduler, rid: str, limit: int = 200) -> Iterator[SchedulerOutput]:
    for _ in range(limit):
        if rid not in s.requests:
            return
        yield _step(s)
    raise AssertionError(f"{rid} did not finish in {limit} steps")


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_scheduling(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_the_factory_picks_the_base_vllm_would(async_scheduling: bool) -> None:
    s = _scheduler(async_scheduling=async_scheduling)
    expected = AsyncTenantFairScheduler if async_scheduling else TenantFairScheduler
    assert type(s) is expected


def test_an_interactive_request_runs_without_bulk_prefill_beside_it(
    async_scheduling: bool,
) -> None:
    s = _scheduler(async_scheduling=async_scheduling)
    bulk = _request(s, 1024, SHARED, max_tokens=4)
    first = _step(s)
    assert first.num_scheduled_tokens == {bulk: 128}  # capped: someone else is active
    quick = _request(s, 32, INTERACTIVE, max_tokens=4)
    steps = list(_until_finished(s, quick))
    assert all(bulk not in o.num_scheduled_tokens for o in steps)  # held while it ran
    assert steps[0].num_scheduled_tokens[quick] == 32
    after = _step(s)  # then the bulk prefill goes on, in short steps
    assert after.num_scheduled_tokens == {bulk: 128}


def test_bulk_decodes_are_not_held(async_scheduling: bool) -> None:
    s = _scheduler(async_scheduling=async_scheduling)
    bulk = _request(s, 64, SHARED, max_tokens=50)
    _step(s)  # its whole prompt
    quick = _request(s, 32, INTERACTIVE, max_tokens=4)
    out = _step(s)
    assert out.num_scheduled_tokens.get(quick) == 32
    assert out.num_scheduled_tokens.get(bulk) == 1  # one decode token beside it


def test_a_waiting_bulk_request_is_held_too(async_scheduling: bool) -> None:
    s = _scheduler(async_scheduling=async_scheduling)
    quick = _request(s, 32, INTERACTIVE, max_tokens=6)
    _step(s)
    bulk = _request(s, 512, SHARED)
    steps = list(_until_finished(s, quick))
    assert all(bulk not in o.num_scheduled_tokens for o in steps)
    assert _step(s).num_scheduled_tokens == {bulk: 128}


def test_a_held_request_runs_once_its_hold_ran_out(async_scheduling: bool) -> None:
    s = _scheduler(async_scheduling=async_scheduling, hold=0.0000001)
    bulk = _request(s, 1024, SHARED)
    _step(s)
    quick = _request(s, 32, INTERACTIVE, max_tokens=8)
    steps = list(_until_finished(s, quick))
    assert any(bulk in o.num_scheduled_tokens for o in steps)  # never starved
    assert all(sum(o.num_scheduled_tokens.values()) <= 128 for o in steps[1:])


def test_work_of_a_tenant_alone_is_never_capped(async_scheduling: bool) -> None:
    s = _scheduler(async_scheduling=async_scheduling)
    alone = _request(s, 1024, ALONE)
    assert _step(s).num_scheduled_tokens == {alone: 1024}


def test_work_granted_alone_yields_to_a_tenant_that_arrives_after_it(
    async_scheduling: bool,
) -> None:
    """Rule 4: a tenant's bulk work granted while it was alone keeps its priority; another
    tenant's request that arrives later (interactive) runs without its prefill beside it, and
    the bulk prefill goes on in capped steps while that tenant is there."""
    s = _scheduler(async_scheduling=async_scheduling)
    alone = _request(s, 4000, ALONE, arrival=100.0)
    assert _step(s).num_scheduled_tokens == {alone: BUDGET}  # uncapped: nobody else
    quick = _request(s, 32, INTERACTIVE, max_tokens=4, arrival=200.0)
    steps = list(_until_finished(s, quick))
    assert all(alone not in o.num_scheduled_tokens for o in steps)  # held while it ran
    assert _step(s).num_scheduled_tokens == {alone: 4000 - BUDGET}  # gone: the rest, uncapped


def test_bulk_work_granted_alone_is_capped_while_a_later_tenant_waits_on_it(
    async_scheduling: bool,
) -> None:
    s = _scheduler(async_scheduling=async_scheduling, hold=0.0000001)
    alone = _request(s, 4000, ALONE, arrival=100.0)
    _step(s)
    quick = _request(s, 32, INTERACTIVE, max_tokens=8, arrival=200.0)
    steps = list(_until_finished(s, quick))
    assert any(alone in o.num_scheduled_tokens for o in steps)  # its hold ran out: it runs,
    assert all(o.num_scheduled_tokens.get(alone, 0) <= 128 for o in steps)  # in short steps


def test_a_tenants_own_later_work_does_not_yield_to_its_first_request(
    async_scheduling: bool,
) -> None:
    """An interactive request that arrived *before* the bulk work may be the same tenant's
    (its first request, its next ones granted alone): nothing is held or capped."""
    s = _scheduler(async_scheduling=async_scheduling)
    first = _request(s, 32, INTERACTIVE, max_tokens=8, arrival=100.0)
    more = _request(s, 1024, ALONE, arrival=200.0)
    assert _step(s).num_scheduled_tokens == {first: 32, more: 1024}


def test_interactive_requests_beside_each_other_are_not_capped(async_scheduling: bool) -> None:
    s = _scheduler(async_scheduling=async_scheduling)
    a = _request(s, 1024, INTERACTIVE)
    b = _request(s, 512, INTERACTIVE)
    assert _step(s).num_scheduled_tokens == {a: 1024, b: 512}


def test_without_the_rules_bulk_prefill_shares_the_interactive_steps(
    async_scheduling: bool,
) -> None:
    """The behaviour the rules change: with both off, vLLM runs the bulk prefill whole, in the
    interactive request's first step."""
    s = _scheduler(async_scheduling=async_scheduling, bulk=0, hold=0)
    bulk = _request(s, 1024, SHARED)
    quick = _request(s, 32, INTERACTIVE)
    out = _step(s)
    assert out.num_scheduled_tokens == {quick: 32, bulk: 1024}
    assert s.held_steps == 0  # type: ignore[attr-defined]


#: a slow device: 0.5 ms a token (a 128-token step takes 64 ms)
SLOW = 0.0005


def test_on_a_slow_device_bulk_steps_shrink_to_the_step_time(async_scheduling: bool) -> None:
    s = _scheduler(async_scheduling=async_scheduling, step_ms=5.0)
    bulk = _request(s, 1024, SHARED)
    assert _step(s, SLOW).num_scheduled_tokens == {bulk: 128}  # nothing timed yet
    # 5 ms hold 10 tokens at this speed: the floor
    assert _step(s, SLOW).num_scheduled_tokens == {bulk: MIN_BULK_STEP_TOKENS}
    assert s.bulk_cap() == MIN_BULK_STEP_TOKENS  # type: ignore[attr-defined]


def test_the_step_time_sets_the_cap_between_floor_and_token_cap(async_scheduling: bool) -> None:
    s = _scheduler(async_scheduling=async_scheduling, step_ms=20.0)
    bulk = _request(s, 1024, SHARED)
    _step(s, SLOW)
    steps = [_step(s, SLOW).num_scheduled_tokens[bulk] for _ in range(3)]
    # 20 ms hold 40 tokens at 0.5 ms each (fewer by the step's own overhead)
    assert all(MIN_BULK_STEP_TOKENS < n <= 40 for n in steps), steps


def test_a_fast_device_keeps_the_token_cap(async_scheduling: bool) -> None:
    s = _scheduler(async_scheduling=async_scheduling, step_ms=1000.0)
    bulk = _request(s, 1024, SHARED)
    steps = [_step(s).num_scheduled_tokens for _ in range(4)]
    assert steps == [{bulk: 128}] * 4
    assert s.step_s_per_token is not None  # type: ignore[attr-defined]  # it was timed


def test_without_a_step_time_only_the_token_cap_applies(async_scheduling: bool) -> None:
    s = _scheduler(async_scheduling=async_scheduling, step_ms=0.0)
    bulk = _request(s, 1024, SHARED)
    assert [_step(s, SLOW).num_scheduled_tokens for _ in range(2)] == [{bulk: 128}] * 2


def test_a_slow_device_never_caps_a_tenant_alone(async_scheduling: bool) -> None:
    s = _scheduler(async_scheduling=async_scheduling, step_ms=5.0)
    bulk = _request(s, 1024, SHARED)
    _step(s, SLOW)  # the engine learns it is slow
    alone = _request(s, 512, ALONE)
    s.finish_requests(bulk, RequestStatus.FINISHED_ABORTED)
    assert _step(s, SLOW).num_scheduled_tokens == {alone: 512}


def test_options_refuse_negative_values() -> None:
    with pytest.raises(ValueError):
        options(-1, 0.5)
    with pytest.raises(ValueError):
        options(128, 0.5, -1.0)
    with pytest.raises(ValueError):
        options(128, 0.5, 5.0, -1.0)


def _bulk_beside_a_finished_lone_request(s: Scheduler) -> str:
    """A bulk prefill that has begun, then another tenant's lone request run to its end: the
    moment rule 5 is about. Returns the bulk request's id."""
    bulk = _request(s, 1024, SHARED)
    _step(s)
    quick = _request(s, 32, INTERACTIVE, max_tokens=2)
    list(_until_finished(s, quick))
    return bulk


def test_bulk_stays_held_for_the_grace_after_an_interactive_request(
    async_scheduling: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rule 5: the tenant's next request, sent as soon as the last one ended, finds no bulk
    step begun in the gap; once the grace is over the bulk prefill goes on; and a step with
    only held work waits a moment instead of spinning."""
    from kvaas.engine import scheduler as module

    waits: list[float] = []
    real_sleep = time.sleep
    monkeypatch.setattr(module.time, "sleep", lambda s: (waits.append(s), real_sleep(s)))
    s = _scheduler(async_scheduling=async_scheduling, grace_ms=300.0)
    bulk = _bulk_beside_a_finished_lone_request(s)
    idle = _step(s)  # in the grace: the bulk prefill does not start a step
    assert idle.total_num_scheduled_tokens == 0 and [w for w in waits if w] == [0.001]
    following = _request(s, 32, INTERACTIVE, max_tokens=2)
    steps = list(_until_finished(s, following))
    assert steps[0].num_scheduled_tokens == {following: 32}
    assert all(bulk not in o.num_scheduled_tokens for o in steps)
    time.sleep(0.35)  # the grace runs out
    assert _step(s).num_scheduled_tokens == {bulk: 128}


def test_without_a_grace_bulk_goes_on_at_once(async_scheduling: bool) -> None:
    s = _scheduler(async_scheduling=async_scheduling, grace_ms=0.0)
    bulk = _bulk_beside_a_finished_lone_request(s)
    assert _step(s).num_scheduled_tokens == {bulk: 128}


def test_the_grace_holds_no_longer_than_the_hold_limit(async_scheduling: bool) -> None:
    """Rule 2 bounds the grace's holding as every other: work held past ``max_hold_s`` runs."""
    s = _scheduler(async_scheduling=async_scheduling, grace_ms=10_000.0, hold=0.05)
    bulk = _bulk_beside_a_finished_lone_request(s)
    time.sleep(0.1)
    assert bulk in _step(s).num_scheduled_tokens  # within a 10 s grace
