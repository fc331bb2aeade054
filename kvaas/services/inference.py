"""Generation for the OpenAI-compatible routes: on a stored cache, or plainly on the engine.

A request names a cache (:class:`CacheRef`) or not. With one, the cache service attaches it
(the cache's tokens first, the request's after them, with its hit/miss and metering rules).
Without one the request's prompt runs on the engine as it is: tokenized and checked by the
prompt policy (``service.prompts``: an engine must run, the prompt is one non-empty form,
prompt + ``max_tokens`` fit the model), with the tenant's salt so no tenant reuses another's
engine-side prefix cache. An engine failure before the first token is
``503 engine_unavailable``.

Every request is metered once, by its request id: with a cache as an attach, without one by
:func:`kvaas.metering.hooks.on_inference` (the prompt tokens the engine computed and the
tokens it generated). The engine runs while the request holds a slot of the service's gate
(``429 engine_busy`` when its tenant's turn does not come); a stream holds it until it ends or
its client goes, and is metered then with the tokens produced so far.

An :class:`Inference` is one such request; a :class:`Run` carries its generation and counts (a
streamed run's generation fills up as its deltas are consumed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.db.models import Tenant
from kvaas.engine import EngineError, Generation, Sampling
from kvaas.errors import EngineUnavailable
from kvaas.metering import hooks as metering
from kvaas.services.caches import AttachOutcome, CacheRef, CacheService, Prompt
from kvaas.services.streams import metered


@dataclass
class Run:
    """One request's generation, with or without a cache (``outcome``), and its counts."""

    outcome: AttachOutcome | None
    generation: Generation = field(default_factory=Generation)
    plain_prompt_tokens: int = 0  # the prompt's tokens when no cache is attached

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the whole prompt (an attached cache's included)."""
        return self.outcome.prompt_tokens if self.outcome else self.plain_prompt_tokens

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose KV was reused instead of computed."""
        return self.outcome.cached_tokens if self.outcome else self.generation.cached_tokens

    @property
    def completion_tokens(self) -> int:
        return len(self.generation.token_ids)

    async def meter(self, session: AsyncSession, tenant_id: str, request_id: str) -> None:
        """Record (not commit) the usage of a run without a cache: the prompt tokens the
        engine computed, and those it generated."""
        await metering.on_inference(
            session,
            tenant_id,
            prefill_tokens=max(0, self.plain_prompt_tokens - self.generation.cached_tokens),
            output_tokens=self.completion_tokens,
            request_id=request_id,
        )


@dataclass(frozen=True)
class Inference:
    """One request to run: the tenant's, on its session and the cache service, with the cache
    it attaches (:class:`CacheRef`), its prompt and its sampling; ``request_id`` meters it."""

    service: CacheService
    session: AsyncSession
    tenant: Tenant
    ref: CacheRef
    prompt: Prompt
    sampling: Sampling
    request_id: str

    async def plain_ids(self) -> list[int]:
        """Token ids of the prompt run without a cache, checked against the model's limits."""
        policy = self.service.prompts
        ids = await policy.tokenize(
            self.prompt, continuation=False, generation_prompt=True, ids_param="prompt"
        )
        policy.require_tokens(ids, param="prompt")
        policy.check_generation(len(ids), self.sampling.max_tokens, f"prompt ({len(ids)})")
        return ids


async def generate(inf: Inference) -> Run:
    """Run the request to its end; its usage is committed before this returns."""
    service, tenant = inf.service, inf.tenant
    if inf.ref.attached:
        outcome = await service.attach(
            inf.session, tenant, inf.ref, inf.prompt, inf.sampling, inf.request_id
        )
        return Run(outcome, outcome.generation)
    engine = service.prompts.engine
    ids = await inf.plain_ids()
    await inf.session.commit()  # no database connection held while the engine runs
    try:
        async with service.gate.slot(tenant.id):
            gen = await engine.generate(ids, service.salted(tenant, inf.sampling))
    except EngineError as e:
        raise EngineUnavailable.failed(e) from e
    run = Run(None, gen, len(ids))
    await run.meter(inf.session, tenant.id, inf.request_id)
    await inf.session.commit()
    return run


async def generate_stream(inf: Inference) -> tuple[Run, AsyncIterator[Generation]]:
    """Start the request (errors, ``429`` and an engine failure before the first token
    included, are raised here): its run, and its deltas as the engine produces them (the
    run's generation absorbs each delta when no cache is attached; the cache service keeps an
    attached run's outcome current itself). The usage is recorded when the deltas end, fail
    or are closed, with what was produced until then."""
    service, tenant = inf.service, inf.tenant
    if inf.ref.attached:
        outcome, stream = await service.attach_stream(
            inf.session, tenant, inf.ref, inf.prompt, inf.sampling, inf.request_id
        )
        return Run(outcome, outcome.generation), stream
    engine = service.prompts.engine
    ids = await inf.plain_ids()
    await inf.session.commit()  # no database connection held while the engine runs
    run = Run(None, Generation(), len(ids))
    tenant_id = tenant.id

    async def record() -> None:
        async with service.db.session() as s:  # the request's session may be closed by now
            await run.meter(s, tenant_id, inf.request_id)
            await s.commit()

    deltas = metered(
        engine.stream(ids, service.salted(tenant, inf.sampling)),
        run.generation.absorb,
        record,
        service.settling,
    )
    try:
        return run, await service.gate.stream(tenant_id, deltas)
    except EngineError as e:
        raise EngineUnavailable.failed(e) from e
