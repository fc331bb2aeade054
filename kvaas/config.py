"""Service configuration.

Every setting is read from an environment variable with the prefix ``KVAAS_`` (for example
``KVAAS_DATABASE_URL``) or from a ``.env`` file in the working directory. Defaults are the
embedded ones: a SQLite file under the data directory, local storage tiers and the built-in
``tiny`` model, so the service starts with no server to run beside it.

The configuration table of ``docs/configuration.md`` is generated from this class
(``kvaas config markdown``) and a test checks that the two agree.

(This module is about 790 lines on purpose: it is the one ``Settings`` class, one
documented field per knob, from which both the environment parsing and the documentation table
come; split across modules, the table and the validators would have to reassemble it.)
"""

from __future__ import annotations

import base64
import contextlib
import re
import typing
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

StorageClass = Literal["hot", "standard", "cold"]
#: Shortest admin token accepted: a token short enough to guess is refused at start-up.
MIN_ADMIN_TOKEN_CHARS = 32
Compression = Literal["none", "lossless", "int8", "int4"]


class Settings(BaseSettings):
    """All knobs of a KVaaS process. Field descriptions are the documentation."""

    model_config = SettingsConfigDict(
        env_prefix="KVAAS_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
        hide_input_in_errors=True,  # errors name the setting, never echo a value (keys)
    )

    # --- process -----------------------------------------------------------------------
    data_dir: Path = Field(
        Path(".kvaas"),
        description="Directory for embedded state: SQLite file, disk tier, built models.",
    )
    host: str = Field("127.0.0.1", description="Address `kvaas serve` binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port `kvaas serve` listens on.")
    workers: int = Field(1, ge=1, le=64, description="Uvicorn worker processes for `serve`.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level of the service."
    )

    # --- metadata database ---------------------------------------------------------------
    database_url: str | None = Field(
        None,
        description=(
            "SQLAlchemy URL of the metadata database, e.g. "
            "`postgresql+psycopg://user@host:5432/kvaas`. Default: SQLite file "
            "`<data_dir>/kvaas.db`."
        ),
    )
    database_pool_size: int = Field(10, ge=1, description="Connection pool size (PostgreSQL).")
    database_timeout_seconds: float = Field(
        5.0, gt=0, description="Connect / statement timeout towards the database."
    )
    auto_migrate: bool = Field(
        True, description="Apply pending database migrations when the service starts."
    )

    # --- security ------------------------------------------------------------------------
    admin_token: SecretStr | None = Field(
        None,
        description=(
            "Bearer token for `/admin/api`, at least 32 characters (`openssl rand -hex 32`; "
            "shorter ones stop start-up). Unset or blank: the admin API answers 403 and tenants "
            "are managed with the CLI only."
        ),
    )
    admin_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description=(
            "Port of a separate listener for `/admin/api`, started by `kvaas serve` beside the "
            "public one. Set: the public port answers 404 under `/admin`. Unset: the admin API "
            "is served on the public port."
        ),
    )
    admin_host: str | None = Field(
        None,
        description="Address the separate admin listener binds to (with `admin_port`). "
        "Default: `127.0.0.1`, reachable from this host only.",
    )
    max_request_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest accepted request body (413 above)."
    )
    dashboard_session_seconds: int = Field(
        8 * 3600,
        ge=60,
        le=7 * 86400,
        description=(
            "Lifetime of an admin dashboard session (`/admin`) after logging in with the admin "
            "token; the signed cookie is refused afterwards."
        ),
    )
    dashboard_secure_cookie: bool = Field(
        False,
        description=(
            "Mark the dashboard's session cookie `Secure` even when the request reached the "
            "gateway over plain HTTP (set it behind a TLS-terminating proxy); requests over "
            "HTTPS always get a `Secure` cookie."
        ),
    )

    # --- storage tiers -------------------------------------------------------------------
    redis_url: str | None = Field(
        None,
        description=(
            "Redis URL for the shared tier, e.g. `redis://127.0.0.1:6379/0`. Unset: no Redis tier."
        ),
    )
    redis_cluster: bool = Field(
        False, description="Treat `redis_url` as a Redis Cluster entry node."
    )
    redis_prefix: str = Field(
        "kvaas", description="Prefix of every Redis key the store writes (one per deployment)."
    )
    memory_tier_bytes: int = Field(
        1024**3, ge=0, description="Byte budget of the in-process memory tier (0 disables it)."
    )
    disk_tier_dir: Path | None = Field(
        None, description="Directory of the disk tier. Default: `<data_dir>/chunks`."
    )
    disk_tier_bytes: int = Field(50 * 1024**3, ge=0, description="Byte budget of the disk tier.")
    store_gc_interval_seconds: float = Field(
        10.0,
        gt=0,
        description=(
            "Seconds between two rounds of the store's garbage collection (its own loop, beside "
            "the maintenance round). A round runs passes of `store_gc_batch` chunks, shared "
            "round-robin between tenants, while a pass fills its batch (at most 20 a round)."
        ),
    )
    store_gc_batch: int = Field(
        1000, ge=1, description="Chunks one garbage-collection pass claims and deletes."
    )
    store_demote_idle_seconds: int = Field(
        3600,
        ge=0,
        description=(
            "`standard` chunks not read for this long move from Redis to disk (checked every "
            "`store_demote_interval_seconds`); 0 disables idle demotion."
        ),
    )
    store_demote_interval_seconds: float = Field(
        300.0, gt=0, description="Seconds between two idle-demotion scans of Redis."
    )
    chunk_tokens: int = Field(
        256, ge=16, description="Tokens per stored chunk; a multiple of the engine block size."
    )
    default_storage_class: StorageClass = Field(
        "standard", description="Storage class of a new cache when the request names none."
    )
    default_compression: Compression = Field(
        "int4", description="Codec scheme of a new cache when the request names none."
    )

    # --- encryption at rest ---------------------------------------------------------------
    encryption_key: SecretStr | None = Field(
        None,
        description=(
            "Master key that encrypts every stored KV chunk (AES-256-GCM under per-tenant keys "
            "derived from it): 32 bytes as 64 hex digits or base64, e.g. `openssl rand -hex 32`. "
            "Unset: a key is generated once as `<data_dir>/master.key` (mode 0600) and reused; "
            "set it, the same on every gateway, when several hosts share the store."
        ),
    )
    encryption_key_id: str = Field(
        "k1",
        pattern=r"^[A-Za-z0-9._-]{1,16}$",
        description=(
            "Id of `encryption_key`, written into every chunk it seals (1-16 letters, digits, "
            "`.`, `_`, `-`). To rotate, set a new key under a new id and move the old one to "
            "`encryption_old_keys`."
        ),
    )
    encryption_old_keys: SecretStr | None = Field(
        None,
        description=(
            "Retired master keys whose chunks stay readable, as `id:key,id:key` (keys as for "
            "`encryption_key`). New chunks are always sealed under `encryption_key`."
        ),
    )

    # --- engine --------------------------------------------------------------------------
    model: str = Field(
        "tiny",
        description=(
            "Model the engine serves: a built-in preset name (`tiny`, built on first use under "
            "`<data_dir>/models`) or the path of a Hugging Face checkpoint directory."
        ),
    )
    engine: Literal["inprocess", "remote", "none"] = Field(
        "inprocess",
        description=(
            "`inprocess`: vLLM inside the gateway; `remote`: `vllm serve` nodes; `none`: API only."
        ),
    )
    engine_urls: list[str] = Field(
        default_factory=list, description="Base URLs of remote `vllm serve` nodes (engine=remote)."
    )
    engine_api_key: SecretStr | None = Field(
        None,
        description=(
            "API key of the remote `vllm serve` nodes (engine=remote): the gateway sends it as a "
            "bearer token on every request, and `kvaas engine command` starts nodes requiring it "
            "(`VLLM_API_KEY` in their environment). Unset or blank: nodes answer anyone who can "
            "reach them."
        ),
    )
    engine_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weight and KV dtype of the engine (`auto`: the checkpoint's)."
    )
    engine_max_model_len: int = Field(
        4096, ge=128, description="Longest sequence (cache + request + output) the engine runs."
    )
    engine_tensor_parallel_size: int = Field(
        1,
        ge=1,
        le=64,
        description="Tensor-parallel size of every engine (in process, and the nodes `kvaas "
        "engine command` starts). Each rank stores its share of a chunk under its own key; "
        "the gateway names every rank's key in manifests, presence checks, quotas and garbage "
        "collection, and refuses a node reporting another size.",
    )
    engine_pipeline_parallel_size: int = Field(
        1,
        ge=1,
        le=64,
        description="Pipeline-parallel size of every engine (as the tensor-parallel size).",
    )
    engine_eager: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Run the engine eagerly (no compilation, no CUDA graphs): `auto` on a CPU "
        "only; `on`/`off` everywhere (in process, and on the node command).",
    )
    engine_gpu_memory_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="On a GPU: the fraction of its memory vLLM may use (weights, activations "
        "and a KV cache sized from what they leave). Unset: the KV cache gets "
        "`KVAAS_ENGINE_KV_CACHE_GIB`.",
    )
    engine_max_batched_tokens: int = Field(
        2048, ge=64, description="Tokens the engine computes per step (chunked prefill)."
    )
    engine_prefill_chunk_tokens: int = Field(
        0,
        ge=0,
        description="Most prompt tokens one request may compute in an engine step while other "
        "requests run (vLLM's long-prefill threshold; 0: no cap). A small value keeps every "
        "running request's steps short beside long prefills (lower latency for the others), at "
        "some cost in prefill throughput.",
    )
    engine_bulk_step_tokens: int = Field(
        128,
        ge=0,
        description="While a tenant's bulk work (one of its several requests, granted while "
        "another tenant was active) still has prompt tokens to compute, an engine step computes "
        "at most this many tokens, so another tenant's request that arrives waits for one short "
        "step, not a whole long prefill (0: no cap). See `kvaas.engine.scheduler`.",
    )
    engine_bulk_step_ms: float = Field(
        5.0,
        ge=0,
        le=10_000,
        description="With KVAAS_ENGINE_BULK_STEP_TOKENS: such a step also computes no more "
        "tokens than fit in this many milliseconds at the speed the engine has shown (never "
        "fewer than 16), so the wait stays short on a slow device too; a device that runs the "
        "token cap within this time keeps it (0: the token cap alone). See "
        "`kvaas.engine.scheduler`.",
    )
    engine_bulk_max_hold_seconds: float = Field(
        0.5,
        ge=0,
        description="While a tenant's lone request runs in the engine, other tenants' bulk "
        "prefill is held back, each request at most this long since it last computed (then it "
        "runs one step); 0 turns holding off. See `kvaas.engine.scheduler`.",
    )
    engine_interactive_grace_ms: float = Field(
        50.0,
        ge=0,
        le=1_000,
        description="After a tenant's lone request ends, other tenants' bulk prefill stays held "
        "this many milliseconds more, for that tenant's next request (a client that sends "
        "requests one after another would otherwise meet a bulk step begun in the gap); each "
        "costs bulk work at most this much idle time, and KVAAS_ENGINE_BULK_MAX_HOLD_SECONDS "
        "still bounds every hold (0: no grace). See `kvaas.engine.scheduler`.",
    )
    engine_ipc_spin_seconds: float | None = Field(
        None,
        ge=0,
        le=10,
        description="How long vLLM's processes poll their step queues in a busy loop after a "
        "read before they sleep on the queue's socket (a sleeping reader looks again within "
        "1-50 ms, so a lost wake-up never holds a step). Unset: 0 on a CPU engine (a spinning "
        "process takes a core from the forward pass and the gateway), vLLM's own 1 s on a GPU. "
        "See `kvaas.engine.ipc_wait`.",
    )
    connector_presence_ttl_seconds: float = Field(
        2.0,
        ge=0,
        description="Seconds the engine's scheduler remembers a chunk it found stored, so a "
        "lookup of recently seen chunks does no I/O (absence is never remembered; a chunk gone "
        "meanwhile is a failed load the engine recomputes, never wrong KV). 0: every lookup "
        "asks the store.",
    )
    connector_save_queue_bytes: int = Field(
        0,
        ge=0,
        description="Bytes of staged KV the engine's connector may queue for saving in the "
        "background (encode, seal, write off the engine's step thread; a step waits only while "
        "the queue is full; 64 MiB is a good size). 0: each step encodes and writes the chunks "
        "it completed before the next step runs. Either way a create is ready only once every "
        "chunk is stored.",
    )
    connector_decoded_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description="Bytes of GPU or CPU memory (the KV cache's device) each engine worker may "
        "spend on a pre-decoded tier: the most recently loaded chunks kept in the engine's "
        "dtype and layout, so attaching them again is one copy (no fetch, no decode). Chunks "
        "are promoted into it in the background after a load. 0 turns it off. The store still "
        "decides what is loaded: a deleted cache is never served from it.",
    )
    connector_layerwise_loads: bool = Field(
        False,
        description="Load stored KV layer by layer in the background: an engine worker fetches "
        "and decodes a step's chunks on its own thread and copies them into the paged blocks "
        "one layer at a time, and each attention layer waits only for its own layer, so the "
        "forward pass starts while the load runs. Every load is done before the step ends. "
        "Off: each step loads its chunks before the forward pass.",
    )
    connector_warm_on_save: bool = Field(
        True,
        description="An engine worker keeps the chunks it saves in its own memory tier too "
        "(best effort, within `KVAAS_MEMORY_TIER_BYTES`), so the attaches routed back to the "
        "node that made a cache read no shared tier. Off: the memory tier holds only chunks "
        "loaded before.",
    )
    engine_prefix_caching: bool = Field(
        True,
        description="Let vLLM reuse KV still in its own memory before asking the store.",
    )
    engine_kv_cache_gib: float = Field(
        1.0,
        gt=0,
        description="Memory for vLLM's paged KV, in GiB: the in-process engine's, and that of "
        "the nodes `kvaas engine command` starts (`--kv-cache-memory-bytes`, CPU and GPU).",
    )
    engine_request_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="Longest one engine request (prefill, attach, completion; a stream from "
        "start to end) may run; then it is aborted and answered 503 `engine_unavailable`.",
    )
    engine_restart_attempts: int = Field(
        3,
        ge=0,
        description="Starts tried in a row when the in-process engine dies (requests get 503 "
        "`engine_unavailable` meanwhile); after that, or with 0, `/healthz` fails so that the "
        "process supervisor restarts the gateway.",
    )
    engine_node_max_failures: int = Field(
        3,
        ge=1,
        description="Consecutive failures (refused connections, 5xx answers, failed probes) "
        "after which a remote engine node is ejected from routing (engine=remote).",
    )
    engine_node_cooldown_seconds: float = Field(
        10.0,
        gt=0,
        description="How long an ejected remote engine node gets no requests before a probe may "
        "take it back (engine=remote).",
    )
    engine_node_probe_seconds: float = Field(
        5.0,
        gt=0,
        description="Interval of the active health probes of the remote engine nodes (each "
        "node's `/health` and model fingerprint; engine=remote).",
    )
    engine_routing: Literal["cache_aware", "least_loaded", "round_robin"] = Field(
        "cache_aware",
        description="How the gateway picks a remote engine node (engine=remote): `cache_aware` "
        "sends a cache's requests to the node that served it (its memory tier holds the "
        "chunks) unless that node is unusable or much busier, else the least loaded; "
        "`least_loaded`; `round_robin`. See the sizing guide.",
    )
    engine_node_max_inflight: int = Field(
        0,
        ge=0,
        description="Requests one remote engine node may have in flight (0: no limit); more "
        "wait in the gateway for a free node (engine=remote).",
    )
    engine_node_weights: list[float] = Field(
        default_factory=list,
        description="One positive weight per entry of `KVAAS_ENGINE_URLS` (load is compared in "
        "requests in flight per unit of weight; empty: all 1).",
    )
    engine_route_capacity: int = Field(
        100_000,
        ge=1,
        description="Caches the router remembers the node of (least recently used "
        "forgotten first).",
    )
    engine_route_imbalance: float = Field(
        4.0,
        gt=0,
        description="How much busier (requests in flight per unit of weight) than the least "
        "loaded node a cache's own node may be before its request goes to the least loaded one.",
    )
    engine_route_prefix_imbalance: float = Field(
        1.0,
        gt=0,
        description="The same threshold for a node found by the cache's shared first chunk only "
        "(another cache on the same prefix).",
    )
    engine_hot_cache_rate: float = Field(
        2.0,
        gt=0,
        description="Requests per second (decayed, 30 s half-life) at which a cache counts as hot "
        "and may be pinned to more than one node.",
    )
    engine_hot_cache_nodes: int = Field(2, ge=1, description="Nodes a hot cache may be pinned to.")

    # --- caches --------------------------------------------------------------------------
    default_ttl_seconds: int = Field(
        3600, ge=1, description="Lifetime of a new cache when the request names none."
    )
    min_ttl_seconds: int = Field(60, ge=1, description="Shortest `ttl_seconds` accepted.")
    max_ttl_seconds: int = Field(
        30 * 24 * 3600, ge=1, description="Longest `ttl_seconds` accepted (30 days)."
    )
    default_max_caches: int = Field(
        1_000,
        ge=0,
        description=(
            "Most live (pending or ready) caches a tenant may hold when its own `max_caches` "
            "is unset (429 `cache_limit_exceeded` above)."
        ),
    )
    default_storage_quota_tokens: int | None = Field(
        5_000_000,
        ge=0,
        description=(
            "Storage quota in tokens of a tenant whose own `storage_quota_tokens` is unset "
            "(402 `quota_exceeded` above); `unlimited` lifts it for such tenants."
        ),
    )
    default_storage_quota_bytes: int | None = Field(
        5 * 1024**3,
        ge=0,
        description=(
            "Storage quota in stored bytes of a tenant whose own `storage_quota_bytes` is unset "
            "(5 GiB; 402 `quota_exceeded` above); `unlimited` lifts it for such tenants."
        ),
    )
    prefill_lease_seconds: int = Field(
        120,
        ge=5,
        description=(
            "How long a pending prefill's version stays vouched for by the gateway running it "
            "(renewed every maintenance round). A pending version past its lease lost its "
            "gateway: the next sweep fails it and releases what it stored."
        ),
    )
    maintenance_interval_seconds: float = Field(
        30.0,
        gt=0,
        description=(
            "Seconds between two rounds of the gateway's maintenance: expiry sweep, prefill "
            "leases, store-release outbox, reconciler, garbage collection."
        ),
    )
    reconcile_batch: int = Field(
        200,
        ge=1,
        description=(
            "Retired caches (and live caches) the reconciler compares with the store per "
            "maintenance round, looking for manifests no live version owns."
        ),
    )

    # --- engine fairness -----------------------------------------------------------------
    engine_max_inflight: int = Field(
        32,
        ge=1,
        description="Engine requests (prefills, attaches, completions) a gateway process runs "
        "at once, all tenants together; more wait in their tenant's queue.",
    )
    tenant_max_inflight: int = Field(
        4,
        ge=1,
        description="Engine requests one tenant may run at once in a gateway process; its "
        "next ones wait their turn (freed slots go to tenants in turn).",
    )
    tenant_max_inflight_shared: int = Field(
        1,
        ge=1,
        description="Engine requests one tenant may run at once while another tenant is "
        "active (has engine work running or waiting, or had within `tenant_active_seconds`); "
        "at most `tenant_max_inflight`. Keeps a busy tenant from lengthening every other "
        "tenant's engine steps; alone, it gets `tenant_max_inflight` back.",
    )
    tenant_active_seconds: float = Field(
        2.0,
        gt=0,
        description="How long a tenant counts as active after its last engine request ends "
        "(so a client sending requests one after the other stays active between them).",
    )
    tenant_max_queued: int = Field(
        16,
        ge=0,
        description="Engine requests one tenant may have waiting in a gateway process; one more "
        "is refused at once (429 `engine_busy`).",
    )
    engine_queue_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="Longest wait for an engine slot; then 429 `engine_busy`.",
    )

    # --- limits --------------------------------------------------------------------------
    rate_limit_per_second: float = Field(
        50.0,
        ge=0,
        description=(
            "Requests per second each API key may make (token bucket refill rate; 0 disables "
            "rate limiting). Kept in Redis when `redis_url` is set, shared by all workers."
        ),
    )
    rate_limit_burst: int = Field(
        100, ge=1, description="Requests an API key may make at once (token bucket size)."
    )
    unauth_rate_limit_per_second: float = Field(
        0.2,
        ge=0,
        description=(
            "Failed authentications per second each client address may make: bad or missing "
            "API keys, wrong admin tokens, Stripe webhooks that do not verify (token bucket "
            "refill rate; 0 disables). An address whose bucket is empty gets 429 on every API "
            "route, before any key lookup, until a token is back. Kept in Redis when "
            "`redis_url` is set."
        ),
    )
    unauth_rate_limit_burst: int = Field(
        20, ge=1, description="Failed authentications a client address may make at once."
    )
    auth_cache_seconds: float = Field(
        2.0,
        ge=0,
        le=60,
        description=(
            "How long this gateway process remembers an API key that authenticated, so a "
            "client's next requests skip the key lookup (0: look every request up). Revoking "
            "a key, disabling a tenant or changing its limits takes effect at once on the "
            "process that made the change and within this many seconds on the others."
        ),
    )
    refusal_pace_seconds: float = Field(
        0.25,
        ge=0,
        le=5,
        description=(
            "How long a `429` answer (engine busy, rate limit, ...) is held before it is sent, "
            "so a client that retries at once in a loop makes at most one try per this many "
            "seconds per connection (0: answer at once). See `kvaas.api.pacing`."
        ),
    )
    idempotency_ttl_seconds: int = Field(
        24 * 3600,
        ge=60,
        description="How long a stored `Idempotency-Key` response is replayed (24 hours).",
    )
    idempotency_key_max_length: int = Field(
        255, ge=8, le=1024, description="Longest accepted `Idempotency-Key` header value."
    )
    idempotency_in_flight_lease_seconds: int = Field(
        900,
        ge=1,
        description=(
            "An `Idempotency-Key` held `in_flight` longer than this belongs to a request whose "
            "gateway died: a retry takes it over (and, for a create that recorded its cache, "
            "answers with that cache instead of creating another)."
        ),
    )
    idempotency_max_stored_bytes: int = Field(
        256 * 1024,
        ge=1024,
        description=(
            "Largest response body kept for `Idempotency-Key` replays. A larger response "
            "(a long completion) is not kept: a retry gets `409 idempotency_conflict` "
            "(`reason: response_not_stored`) and the request does not run twice."
        ),
    )

    # --- billing -------------------------------------------------------------------------
    stripe_api_key: SecretStr | None = Field(
        None, description="Stripe secret key. Unset: invoices are kept locally only."
    )
    stripe_webhook_secret: SecretStr | None = Field(
        None, description="Signing secret of the Stripe webhook endpoint."
    )
    stripe_api_base: str | None = Field(
        None,
        description="Base URL of the Stripe API. Unset: Stripe's own (`https://api.stripe.com`).",
    )
    pricebook_path: Path | None = Field(
        None,
        description=(
            "Price book YAML file, validated at start-up. Default: the packaged "
            "`billing/pricebook.yaml`."
        ),
    )
    budget_hard_limit: bool = Field(
        False,
        description="Refuse new caches (402 `budget_exceeded`) once a tenant's monthly budget "
        "is spent. Off: budgets only record the 80% and 100% crossings.",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _blank_secret_is_unset(cls, v: object, info: ValidationInfo) -> object:
        """Every secret setting: surrounding whitespace is dropped, and a blank value (an
        empty ``KVAAS_…=`` line, an unset compose variable) is unset, never an empty secret."""
        if info.field_name not in _SECRET_FIELDS:
            return v
        text = v.get_secret_value() if isinstance(v, SecretStr) else v
        if isinstance(text, str):
            return text.strip() or None
        return v

    @field_validator("admin_token")
    @classmethod
    def _long_admin_token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < MIN_ADMIN_TOKEN_CHARS:
            raise ValueError(
                f"KVAAS_ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN_CHARS} characters "
                "(e.g. `openssl rand -hex 32`), or unset to disable the admin API"
            )
        return v

    @field_validator("database_url")
    @classmethod
    def _normalise_db_url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        v = v.strip()
        # Accept the URLs people paste from their provider and use the psycopg 3 driver.
        for plain in ("postgres://", "postgresql://"):
            if v.startswith(plain):
                return "postgresql+psycopg://" + v[len(plain) :]
        return v

    @field_validator("encryption_key", "encryption_old_keys")
    @classmethod
    def _normalise_encryption_keys(
        cls, v: SecretStr | None, info: ValidationInfo
    ) -> SecretStr | None:
        """Keys as lowercase hex (``id:hex,...`` for the old keys); never echoes a key."""
        if v is None or not v.get_secret_value().strip():
            return None
        if info.field_name == "encryption_key":
            return SecretStr(_master_key(v.get_secret_value()).hex())
        pairs = []
        for item in v.get_secret_value().split(","):
            kid, sep, key = item.strip().partition(":")
            if not sep or not re.fullmatch(r"[A-Za-z0-9._-]{1,16}", kid):
                raise ValueError(
                    "encryption_old_keys must read `id:key,id:key` (ids of 1-16 letters, "
                    "digits, `.`, `_`, `-`)"
                )
            pairs.append(f"{kid}:{_master_key(key).hex()}")
        return SecretStr(",".join(pairs))

    @field_validator("default_storage_quota_tokens", "default_storage_quota_bytes", mode="before")
    @classmethod
    def _unlimited(cls, v: object) -> object:
        """``unlimited`` (any case) lifts a default quota: ``None``."""
        if isinstance(v, str) and v.strip().lower() == "unlimited":
            return None
        return v

    @model_validator(mode="after")
    def _check_admin_bind(self) -> Settings:
        if self.admin_host is not None and self.admin_port is None:
            raise ValueError("KVAAS_ADMIN_HOST needs KVAAS_ADMIN_PORT (the admin listener's port)")
        if self.admin_bind is not None and self.admin_bind == (self.host, self.port):
            raise ValueError("KVAAS_ADMIN_PORT must differ from KVAAS_PORT on the same address")
        return self

    @property
    def admin_bind(self) -> tuple[str, int] | None:
        """``(host, port)`` of the separate admin listener, or ``None`` (admin API on the
        public port)."""
        if self.admin_port is None:
            return None
        return (self.admin_host or "127.0.0.1", self.admin_port)

    @model_validator(mode="after")
    def _check_engine(self) -> Settings:
        if self.engine == "remote" and not self.engine_urls:
            raise ValueError("KVAAS_ENGINE=remote needs KVAAS_ENGINE_URLS (a JSON list of URLs)")
        if self.engine_node_weights and (
            len(self.engine_node_weights) != len(self.engine_urls)
            or min(self.engine_node_weights) <= 0
        ):
            raise ValueError(
                "KVAAS_ENGINE_NODE_WEIGHTS needs one positive weight per entry of KVAAS_ENGINE_URLS"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        """The database URL in force (the SQLite default spelled out)."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'kvaas.db').resolve()}"

    @property
    def resolved_disk_tier_dir(self) -> Path:
        return self.disk_tier_dir or self.data_dir / "chunks"


def _is_secret(annotation: object) -> bool:
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)


#: The settings that hold secrets (their type is ``SecretStr``), found from the annotations.
_SECRET_FIELDS = frozenset(
    name for name, field in Settings.model_fields.items() if _is_secret(field.annotation)
)


def _master_key(text: str) -> bytes:
    """32 key bytes from 64 hex digits or base64 (standard or URL-safe alphabet)."""
    t = text.strip()
    raw = b""
    with contextlib.suppress(ValueError):  # binascii.Error is a ValueError
        if len(t) == 64:
            raw = bytes.fromhex(t)
        else:
            b64 = t.translate(str.maketrans("-_", "+/"))
            raw = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
    if len(raw) != 32:
        raise ValueError(
            "an encryption key must be 32 bytes as 64 hex digits or base64 "
            "(e.g. `openssl rand -hex 32`)"
        )
    return raw


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once."""
    return Settings()


def settings_markdown_table() -> str:
    """The configuration table of ``docs/configuration.md``: variable, default, description."""
    rows = ["| Variable | Default | Description |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if default is None:
            shown = "unset"
        elif isinstance(default, Path):
            shown = f"`{default}`"
        elif isinstance(default, list):
            shown = "`[]`"
        else:
            shown = f"`{default}`"
        rows.append(f"| `KVAAS_{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows)
