"""The FastAPI application factory and its lifespan.

``create_app(settings)`` builds the app; resources (database, Redis, storage, engine) are
opened in the lifespan and closed on shutdown. Nothing is opened at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute

from kvaas import __version__, dashboard
from kvaas.api import account, admin, caches, health, openai_compat
from kvaas.api.admission import EngineAdmissionMiddleware
from kvaas.api.budget import router as budget_router
from kvaas.api.errors import install_error_handlers
from kvaas.api.estimate import router as estimate_router
from kvaas.api.idempotency import IdempotencyMiddleware, sweep_idempotency
from kvaas.api.invoices import router as invoices_router
from kvaas.api.lifecycle import router as lifecycle_router
from kvaas.api.limits_docs import document_limits
from kvaas.api.middleware import RequestContextMiddleware
from kvaas.api.pacing import RefusalPacingMiddleware
from kvaas.api.ratelimit import RateLimitMiddleware, build_address_guard, build_limiter
from kvaas.api.scopes import check_scoped, document_scopes
from kvaas.api.stripe_webhook import router as stripe_webhook_router
from kvaas.api.tags import router as tags_router
from kvaas.api.usage import router as usage_router
from kvaas.auth.cache import AuthCache
from kvaas.billing.pricebook import pricebook_for
from kvaas.config import Settings, get_settings
from kvaas.db.session import Database
from kvaas.engine import build_engine
from kvaas.metering.tiers import TierBilling
from kvaas.services import outbox
from kvaas.services.caches import CacheService
from kvaas.services.fairness import FairGate
from kvaas.services.leader import MaintenanceLocks, upgrade_exclusively
from kvaas.services.prompts import prompt_body_limit
from kvaas.services.reconcile import Reconciler
from kvaas.store.factory import StoreConfig, build_store
from kvaas.store.maintenance import MaintenanceConfig, StoreMaintenance
from kvaas.store.tiered import TieredStore

log = logging.getLogger("kvaas")

API_DESCRIPTION = """\
KVaaS keeps the attention key/value cache of long prompt prefixes in compressed storage tiers
and attaches it to later requests, which then skip the prefill.

Authenticate with `Authorization: Bearer <API key>`. Every error has the body
`{"error": {"type", "message", "param"?, "request_id"}}`; every response carries `X-Request-ID`.
"""


def _operation_id(route: APIRoute) -> str:
    """Stable operation ids: the endpoint function's name (unique across the app)."""
    return route.name


class _RedisProbe:
    """Readiness of the configured Redis through one client kept for the process's life: a
    cluster client learns every node on its first probe, so the probes go on after the node
    named in the URL died (a client built per probe from that one URL could not connect)."""

    def __init__(self, url: str, cluster: bool) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.cluster import RedisCluster

        self.client: Redis | RedisCluster
        if cluster:
            self.client = RedisCluster.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        else:
            self.client = Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)

    async def __call__(self) -> str:
        await self.client.ping()
        return "ping ok"

    async def close(self) -> None:
        await self.client.aclose()


async def _open_store(settings: Settings) -> TieredStore:
    """The gateway's view of the store: the shared tiers (Redis, disk) and the index. The
    memory tier lives in the engine's worker process."""
    cfg = StoreConfig.from_settings(settings)
    cfg.memory_bytes = 0
    store = build_store(cfg)
    await store.open()
    return store


async def _store_probe(store: TieredStore) -> str:
    health = await store.health()
    down = {name: h.detail for name, h in health.items() if h.status != "ok"}
    if down:
        raise RuntimeError("; ".join(f"{n}: {d}" for n, d in down.items()))
    return ", ".join(sorted(health))


async def _maintain_forever(service: CacheService, db: Database, settings: Settings) -> None:
    """The gateway's maintenance, every ``maintenance_interval_seconds``, forever. Each step
    runs on its own (one failing does not skip the others; the next round retries it):

    1. renew the leases of the prefills this process runs;
    2. sweep: expire caches past their time, fail prefills whose gateway died;
    3. drain the store-release outbox;
    4. one bounded reconciler step (manifests no live version owns: queued for release);
    5. expired ``Idempotency-Key`` records, in batches;
    6. garbage collection of unreferenced chunks.

    Steps 2-6 work on shared state: with several gateways on one database each round of each
    runs in one process at a time (:class:`~kvaas.services.leader.MaintenanceLocks`).
    """
    reconciler = Reconciler()
    locks = MaintenanceLocks(db)

    async def renew() -> None:
        async with db.session() as session:
            await service.renew_leases(session)

    async def sweep() -> None:
        async with db.session() as session:
            n = await service.sweep(session)
        if n:
            log.info("expired %d caches", n)

    async def drain() -> None:
        await outbox.drain(db, service.store)

    async def reconcile() -> None:
        await reconciler.step(db, service.store, service.slot_of, batch=settings.reconcile_batch)

    async def idempotency() -> None:
        await sweep_idempotency(db)

    async def collect() -> None:
        await service.store.collect_garbage(grace_s=60.0)

    steps = (renew, sweep, drain, reconcile, idempotency, collect)
    while True:
        await asyncio.sleep(settings.maintenance_interval_seconds)
        for step in steps:
            try:
                await (step() if step is renew else locks.run(step.__name__, step))
            except Exception as e:  # keep maintaining; the next round retries
                log.warning("maintenance step %s failed: %s", step.__name__, e)


def create_admin_app(settings: Settings | None = None) -> FastAPI:
    """The admin API alone (``/admin/api``), for the separate admin listener
    (``KVAAS_ADMIN_PORT``): the metadata database and nothing else (no engine, no store); the
    public application migrates the database."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        app.state.db = Database(
            settings.resolved_database_url,
            pool_size=settings.database_pool_size,
            timeout=settings.database_timeout_seconds,
        )
        try:
            yield
        finally:
            await app.state.db.dispose()

    app = FastAPI(
        title="KVaaS admin",
        version=__version__,
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(RateLimitMiddleware, limiter=None, guard=build_address_guard(settings))
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_request_bytes)
    app.include_router(admin.router)
    dashboard.mount(app)  # the dashboard's pages live beside the admin API
    return app


def _prompt_body_bytes(app: FastAPI, settings: Settings) -> Callable[[], int]:
    """The prompt routes' body limit: what the served context (the engine's, else the
    configured one) can hold."""

    def limit() -> int:
        engine = getattr(app.state, "engine", None)
        served = engine.max_model_len if engine is not None else 0
        return prompt_body_limit(max(served, settings.engine_max_model_len))

    return limit


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application. ``settings`` defaults to the process settings (env / .env).
    With a separate admin listener configured (``KVAAS_ADMIN_PORT``) it leaves ``/admin/api``
    to :func:`create_admin_app`."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        check_scoped(app)  # deny by default: every API-key route declares its scope
        # An invalid price book stops start-up with an error naming the bad field.
        app.state.pricebook = pricebook_for(settings.pricebook_path)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(
            settings.resolved_database_url,
            pool_size=settings.database_pool_size,
            timeout=settings.database_timeout_seconds,
        )
        app.state.db = db
        # a remembered key is trusted only while the database answers: the first sign of an
        # outage forgets them all, so a request is answered alike whether its key was known
        db.on_outage(app.state.auth_cache.clear)
        if settings.auto_migrate:
            try:
                await asyncio.to_thread(upgrade_exclusively, settings.resolved_database_url)
            except Exception as e:  # keep serving; /readyz reports the database
                log.error("database migration failed at start-up: %s", e)

        async def db_probe() -> str:
            await db.ping()
            return db.dialect

        app.state.health_checks["database"] = db_probe
        redis_probe = None
        if settings.redis_url:
            redis_probe = _RedisProbe(settings.redis_url, settings.redis_cluster)
            app.state.health_checks["redis"] = redis_probe
        store = await _open_store(settings)
        app.state.health_checks["store"] = lambda: _store_probe(store)
        engine = build_engine(settings)
        if engine is not None:
            await engine.start()
            app.state.health_checks["engine"] = engine.health
        app.state.engine = engine
        # one gate per process: every engine request of every tenant takes its turn here
        gate = FairGate.from_settings(settings)
        app.state.cache_service = CacheService(settings, store, engine, db, gate)
        sweeper = asyncio.create_task(_maintain_forever(app.state.cache_service, db, settings))
        # the store's own loops: GC in several batches a round, idle demotion, tier billing
        billing = TierBilling(db, store, app.state.cache_service.slot_of)
        jobs = (("tier billing", 30.0, billing.sync_round),)
        cfg = MaintenanceConfig.from_settings(settings, jobs)
        app.state.store_maintenance = StoreMaintenance(store, cfg)
        app.state.store_maintenance.start()
        try:
            yield
        finally:
            # the loop's step in flight rolls back and gives its connections back before the
            # pool is disposed (a task left pending would keep them, and its locks, open)
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await app.state.store_maintenance.stop()
            # background prefills: finish or fail them while the engine is still up
            await app.state.cache_service.drain()
            if engine is not None:
                await engine.shutdown()
            await store.close()
            if redis_probe is not None:
                await redis_probe.close()
            await db.dispose()

    app = FastAPI(
        title="KVaaS",
        version=__version__,
        description=API_DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
    )
    app.state.settings = settings
    app.state.health_checks = {}
    app.state.auth_cache = AuthCache(settings.auth_cache_seconds)
    install_error_handlers(app)
    # Innermost first: idempotency sees only requests the rate limit let through.
    app.add_middleware(
        IdempotencyMiddleware,
        ttl_seconds=settings.idempotency_ttl_seconds,
        max_key_length=settings.idempotency_key_max_length,
        in_flight_lease_seconds=settings.idempotency_in_flight_lease_seconds,
        max_stored_bytes=settings.idempotency_max_stored_bytes,
    )
    # a known key whose tenant's engine slots and queue are all taken: 429 before any work
    app.add_middleware(EngineAdmissionMiddleware)
    app.state.rate_limiter = build_limiter(settings)
    app.add_middleware(
        RateLimitMiddleware,
        limiter=app.state.rate_limiter,
        guard=build_address_guard(settings),
    )
    # every 429 is held a moment: a client retrying at once cannot flood the process
    app.add_middleware(RefusalPacingMiddleware, pace_s=settings.refusal_pace_seconds)
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.max_request_bytes,
        prompt_body_bytes=_prompt_body_bytes(app, settings),
    )
    app.include_router(health.router)
    app.include_router(account.router)
    app.include_router(caches.router)
    app.include_router(lifecycle_router)
    app.include_router(tags_router)
    if settings.admin_bind is None:  # else only the admin listener serves it (and the dashboard)
        app.include_router(admin.router)
        dashboard.mount(app)
    app.include_router(estimate_router)
    app.include_router(usage_router)
    app.include_router(invoices_router)
    app.include_router(budget_router)
    app.include_router(stripe_webhook_router)
    app.include_router(openai_compat.router)
    document_limits(app, max_key_length=settings.idempotency_key_max_length)
    document_scopes(app)
    return app
