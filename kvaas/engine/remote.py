"""A pool of ``vllm serve`` nodes started with the KVaaS connector, reached over HTTP.

Start each node with (``kvaas engine command`` prints it for the current settings)::

    KVAAS_REDIS_URL=<redis url> VLLM_API_KEY=<KVAAS_ENGINE_API_KEY> \\
    python -m kvaas.engine.node --model <model dir> \\
        --served-model-name <name> --enforce-eager \\
        --kv-cache-memory-bytes <KVAAS_ENGINE_KV_CACHE_GIB in bytes> \\
        --enable-prompt-tokens-details \\
        --kv-transfer-config '{"kv_connector": "KVaaSConnector",
                               "kv_connector_module_path": "kvaas.connector.connector",
                               "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                               "kv_connector_extra_config": {"store": {...},
                                   "redis_url_env": "KVAAS_REDIS_URL"}}'

(:mod:`kvaas.engine.node` is vLLM's OpenAI server with one more route, the node's model
fingerprint.) Secrets travel in the node's environment, never on its command line (which every
local user can read): the connector reads the store's Redis URL from ``KVAAS_REDIS_URL``, and
vLLM's server requires ``VLLM_API_KEY`` as a bearer token on its ``/v1`` routes. The gateway
sends ``KVAAS_ENGINE_API_KEY`` as that token on every request (health probes included). The KV
cache size is explicit (``--kv-cache-memory-bytes``, which vLLM honours on CPU and GPU): without
it vLLM's CPU backend asks for most of the machine's memory and a node sharing a machine dies
at start-up.

The nodes must share the store's Redis and/or disk directory with the gateway. The plan travels
as ``kv_transfer_params``. A remote request's completion arrives as one delta when it is done.

Routing (:mod:`kvaas.engine.routing`): by default *cache-aware*: a request whose plan names
chunk keys goes to the node that served that cache before (its connector's memory tier holds
the chunks), else, or when that node is ejected, at its in-flight limit or much busier, to the
least-loaded node; a hot cache is pinned to several nodes. ``routing="least_loaded"`` or
``"round_robin"`` ignore caches. Each node has a weight (its share of the load) and an in-flight
limit (``max_inflight``; 0: none): when every usable node is at its limit a request waits for a
slot. ``/metrics``: ``kvaas_engine_route_total{node,reason}`` counts the decisions,
``kvaas_engine_node_attach_tokens_total{node,source}`` the prompt tokens of attaches
(``prompt``), those the connector found stored (``stored``), those vLLM reports cached
(``cached``: its prefix cache plus loaded chunks) and, when the node's connector reports it,
those served from the node's memory tier (``memory``): ``memory / stored`` is the node's
memory-tier hit rate as the gateway sees it.

Node health: a node is *ejected* (gets no requests) after ``max_failures`` consecutive failures
(a refused or failed connection, a 5xx or 401 answer, a failed probe) until a probe, no sooner
than ``cooldown_s`` after its last failure, finds it healthy (requests never test a node that
may still be down); probes every ``probe_every_s`` check each node's ``/health`` and model
fingerprint. A node whose
fingerprint is not the gateway's is *refused* until a probe finds it matching: its KV would
not be the gateway's model's. A request whose connection failed (nothing reached the node) is
retried on another node; one that may have run is not. :meth:`RemoteEngine.health` reports
``k/N`` nodes usable (:class:`~kvaas.engine.base.Degraded` below ``N``; down at ``0``).
Errors name no node: its URL and answer are in :attr:`~kvaas.engine.base.EngineError.detail`,
for the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client import Counter, Gauge

from kvaas.connector.params import TransferPlan
from kvaas.connector.timings import observe_load_report
from kvaas.engine.base import Degraded, Engine, EngineError, Generation, Liveness, Sampling
from kvaas.engine.model_info import ModelInfo
from kvaas.engine.node import FINGERPRINT_PATH
from kvaas.engine.priorities import (
    ENGINE_PRIORITY,
)
from kvaas.engine.routing import POLICIES, Policy, Router

log = logging.getLogger("kvaas.engine")

ROUTES = Counter(
    "kvaas_engine_route_total",
    "Requests routed to a remote engine node, by node and reason: affinity (the node served "
    "the cache before), hot_spread (a hot cache pinned to one more node), fallback (the "
    "cache's node ejected, at its limit or much busier), least_loaded, round_robin, last_try.",
    ["node", "reason"],
)
ATTACH_TOKENS = Counter(
    "kvaas_engine_node_attach_tokens_total",
    "Prompt tokens of attaches (load plans) answered by a remote engine node, by source: "
    "prompt (all), stored (found in the store by the connector), cached (reported cached by "
    "vLLM), memory (served from the node's memory tier, when its connector reports it).",
    ["node", "source"],
)
INFLIGHT = Gauge(
    "kvaas_engine_node_inflight", "Requests in flight to a remote engine node.", ["node"]
)

#: time limit of one probe request, in seconds
PROBE_TIMEOUT_S = 3.0


@dataclass
class Node:
    """One ``vllm serve`` node and what the gateway knows of its health."""

    url: str
    inflight: int = 0
    #: share of the load (weighted least-connections)
    weight: float = 1.0
    #: most requests in flight at once (0: no limit)
    max_inflight: int = 0
    #: consecutive failures (requests and probes); a success resets it
    failures: int = 0
    #: ``time.monotonic()`` until which even a successful probe does not take it back
    ejected_until: float = 0.0
    #: ejected after ``max_failures``: no requests until a probe (after the cool-down) finds
    #: it healthy again
    ejected: bool = False
    #: why the node is never used (its model fingerprint differs), until a probe clears it
    refused: str | None = None
    last_error: str | None = None

    def usable(self, now: float) -> bool:
        return self.refused is None and not self.ejected and now >= self.ejected_until


class RemoteEngine(Engine):
    """Cache-aware routing over the usable ones of ``urls`` (base URLs of ``vllm serve``
    nodes), with passive ejection and active probes (see the module)."""

    def __init__(
        self,
        model: ModelInfo,
        urls: Sequence[str],
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        max_failures: int = 3,
        cooldown_s: float = 10.0,
        probe_every_s: float = 5.0,
        routing: str = "cache_aware",
        node_max_inflight: int = 0,
        node_weights: Sequence[float] = (),
        route_capacity: int = 100_000,
        route_imbalance: float = 4.0,
        route_prefix_imbalance: float = 1.0,
        hot_rate_per_s: float = 2.0,
        hot_replicas: int = 2,
        world: tuple[int, int] = (1, 1),
    ) -> None:
        """``api_key``: the nodes' ``VLLM_API_KEY``, sent as a bearer token on every request
        (``None``: nodes that accept anyone). ``timeout_s``: the longest one request may
        take. ``routing``: ``cache_aware``, ``least_loaded`` or ``round_robin``;
        ``node_max_inflight``: each node's in-flight limit (0: none); ``node_weights``: one
        positive weight per URL (empty: all 1); ``route_capacity``, ``route_imbalance``,
        ``route_prefix_imbalance``, ``hot_rate_per_s``, ``hot_replicas``: see
        :class:`~kvaas.engine.routing.Router`. ``world``: the tensor- and pipeline-parallel
        sizes every node must report (a node of another world is refused like one of another
        model: its ranks store chunks under other shard keys)."""
        if not urls:
            raise ValueError("a remote engine needs at least one URL")
        if routing not in POLICIES:
            raise ValueError(f"unknown routing policy {routing!r}; choose one of {POLICIES}")
        weights = list(node_weights) or [1.0] * len(urls)
        if len(weights) != len(urls) or any(w <= 0 for w in weights):
            raise ValueError("node_weights needs one positive weight per node URL")
        if node_max_inflight < 0:
            raise ValueError("node_max_inflight must be >= 0 (0: no limit)")
        self.model = model
        self.world = world
        self.nodes = [
            Node(u.rstrip("/"), weight=float(w), max_inflight=node_max_inflight)
            for u, w in zip(urls, weights, strict=True)
        ]
        policy: Policy = routing
        self.router = Router(
            policy,
            capacity=route_capacity,
            imbalance=route_imbalance,
            prefix_imbalance=route_prefix_imbalance,
            hot_rate_per_s=hot_rate_per_s,
            hot_replicas=hot_replicas,
        )
        self._slot_freed = asyncio.Event()
        self._max_failures = max_failures
        self._cooldown_s = cooldown_s
        self._probe_every_s = probe_every_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=5.0), headers=headers
        )
        self._max_model_len = 0
        self._prober: asyncio.Task[None] | None = None

    @property
    def block_size(self) -> int:
        return 0  # not reported by the server; the connector aligns loads itself

    @property
    def max_model_len(self) -> int:
        return self._max_model_len or 4096

    async def start(self) -> None:
        await self.probe()
        self._prober = asyncio.create_task(self._probe_forever(), name="engine node probes")

    async def shutdown(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
            self._prober = None
        await self._client.aclose()

    # --- node health ------------------------------------------------------------------------

    def _failed(self, node: Node, reason: str) -> None:
        node.failures += 1
        node.last_error = reason
        if node.failures >= self._max_failures:
            node.ejected = True
            if time.monotonic() >= node.ejected_until:
                log.warning(
                    "engine node %s ejected for %g s: %s", node.url, self._cooldown_s, reason
                )
                self.router.forget(node.url)  # it may come back restarted, its memory empty
            node.ejected_until = time.monotonic() + self._cooldown_s

    @staticmethod
    def _succeeded(node: Node) -> None:
        node.failures = 0
        node.ejected = False
        node.ejected_until = 0.0
        node.last_error = None

    async def _probe_node(self, node: Node) -> None:
        """Check ``node``'s ``/health`` and fingerprint (and learn its ``max_model_len``)."""
        try:
            r = await self._client.get(f"{node.url}/health", timeout=PROBE_TIMEOUT_S)
            if r.status_code != 200:
                self._failed(node, f"/health answered {r.status_code}")
                return
            r = await self._client.get(f"{node.url}{FINGERPRINT_PATH}", timeout=PROBE_TIMEOUT_S)
            doc = r.json() if r.status_code == 200 else {}
            theirs = doc.get("fingerprint")
            world = tuple(doc.get("world") or (1, 1))
            if theirs != self.model.fingerprint:
                node.refused = (
                    "it reports no model fingerprint (start it with `kvaas engine command`)"
                    if theirs is None
                    else f"its model fingerprint {theirs} is not the gateway's "
                    f"{self.model.fingerprint} (other weights or dtype)"
                )
                return
            if world != self.world:
                node.refused = (
                    f"it runs {world[0]} x {world[1]} workers (tensor x pipeline parallel), "
                    f"the gateway {self.world[0]} x {self.world[1]}: set "
                    "KVAAS_ENGINE_TENSOR_PARALLEL_SIZE / KVAAS_ENGINE_PIPELINE_PARALLEL_SIZE alike"
                )
                return
            if not self._max_model_len:
                r = await self._client.get(f"{node.url}/v1/models", timeout=PROBE_TIMEOUT_S)
                r.raise_for_status()
                for m in r.json().get("data", []):
                    self._max_model_len = max(self._max_model_len, int(m.get("max_model_len") or 0))
        except (httpx.HTTPError, ValueError, AttributeError) as e:
            self._failed(node, f"probe failed: {type(e).__name__}: {e}")
            return
        if node.refused is not None:
            log.warning("engine node %s serves the gateway's model again", node.url)
        node.refused = None
        if time.monotonic() >= node.ejected_until:  # an ejected node waits out its cool-down
            self._succeeded(node)

    async def probe(self) -> None:
        """Probe every node now (what the background probes do every ``probe_every_s``)."""
        await asyncio.gather(*(self._probe_node(n) for n in self.nodes))
        self._slot_freed.set()  # health changed maybe: waiting requests choose again

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self._probe_every_s)
            try:
                await self.probe()
            except Exception:  # keep probing
                log.exception("probing the engine nodes failed")

    def _describe(self, node: Node, now: float) -> str:
        if node.refused is not None:
            return f"{node.url} refused: {node.refused}"
        if now < node.ejected_until:
            return f"{node.url} ejected ({node.last_error})"
        return f"{node.url} failing ({node.last_error})"

    def liveness(self) -> Liveness:
        """``recovering`` while no node is usable (nodes come back by themselves; restarting
        the gateway would not help), else ``ok``."""
        now = time.monotonic()
        return "ok" if any(n.usable(now) for n in self.nodes) else "recovering"

    async def health(self) -> str:
        """``k/N`` nodes up (their last request or probe succeeded); :class:`Degraded` below
        ``N``, naming how many of the others are refused, ejected (routed nothing) and failing
        (still routed until ``max_failures``); :class:`EngineError` when no node is usable (all
        ejected or refused)."""
        now = time.monotonic()
        usable = [n for n in self.nodes if n.usable(now)]
        up = [n for n in usable if n.failures == 0]
        refused = sum(1 for n in self.nodes if n.refused is not None)
        total = len(self.nodes)
        detail = "; ".join(self._describe(n, now) for n in self.nodes if n not in up)
        if not usable:
            raise EngineError(
                f"no vllm serve node is usable ({total} configured, {refused} refused)",
                detail=detail,
            )
        line = f"{len(up)}/{total} vllm serve nodes up"
        if len(up) == total:
            return line
        ejected = sum(1 for n in self.nodes if n.refused is None and not n.usable(now))
        failing = len(usable) - len(up)  # still routed until max_failures
        why = [f"{refused} refused: model fingerprint or world differs"] if refused else []
        if ejected:  # routed nothing (unless no other node is left to try)
            why.append(f"{ejected} ejected")
        if failing:
            why.append(f"{failing} failing")
        return Degraded(f"{line} ({'; '.join(why)})")

    async def _pick(self, tried: set[str], keys: Sequence[bytes]) -> Node | None:
        """The node the router chooses among those not yet ``tried`` (see
        :mod:`kvaas.engine.routing`), waiting for a slot while every usable node is at its
        in-flight limit; ``None`` when no node is left. Counts the decision."""
        while True:
            d = self.router.choose(self.nodes, time.monotonic(), keys=keys, tried=tried)
            if d is None:
                return None
            if d.url is not None:
                ROUTES.labels(d.url, d.reason).inc()
                return next(n for n in self.nodes if n.url == d.url)
            self._slot_freed.clear()
            await self._slot_freed.wait()  # a request finished somewhere: choose again

    # --- requests ---------------------------------------------------------------------------

    def _body(
        self, token_ids: Sequence[int], sampling: Sampling, plan: TransferPlan | None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model.name,
            "prompt": list(token_ids),
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "return_token_ids": True,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.logprobs:
            body["logprobs"] = sampling.logprobs
            body["return_tokens_as_token_ids"] = True  # "token_id:<id>" keys, no decoding
        if sampling.cache_salt is not None:
            body["cache_salt"] = sampling.cache_salt
        if priority := ENGINE_PRIORITY.get():  # nodes run the fair step scheduler
            body["priority"] = priority
        if plan is not None:
            body["kv_transfer_params"] = plan.to_params()
        return body

    async def _post(
        self, body: dict[str, Any], plan: TransferPlan | None = None
    ) -> tuple[Node, httpx.Response]:
        """POST the completion to the node the router picks; on a failed connection (nothing
        was sent) to the next one. The node and its answer, whatever its status;
        :class:`EngineError` when no node could take it or the one that took it failed. A
        request with ``plan`` that succeeded teaches the router where the plan's chunks are."""
        tried: set[str] = set()
        errors: list[str] = []
        keys: Sequence[bytes] = plan.keys if plan is not None else ()
        while (node := await self._pick(tried, keys)) is not None:
            tried.add(node.url)
            node.inflight += 1
            INFLIGHT.labels(node.url).set(node.inflight)
            try:
                r = await self._client.post(f"{node.url}/v1/completions", json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                reason = f"{type(e).__name__}: {e}"
                self._failed(node, reason)
                errors.append(f"vllm serve node {node.url}: {reason}")
                continue  # nothing reached it: another node may take the request
            except httpx.HTTPError as e:
                reason = f"{type(e).__name__}: {e}"
                self._failed(node, reason)
                raise EngineError(
                    "an engine node did not answer",
                    detail=f"vllm serve node {node.url} failed: {reason}",
                ) from e
            finally:
                node.inflight -= 1
                INFLIGHT.labels(node.url).set(node.inflight)
                self._slot_freed.set()
            if r.status_code >= 500 or r.status_code in (401, 403):
                self._failed(node, f"answered {r.status_code}")
            elif r.status_code == 200:
                self._succeeded(node)
                if keys:
                    self.router.record(keys, node.url, time.monotonic())
            return node, r
        raise EngineError(
            "no engine node is available",
            detail="; ".join(errors) or "every node is refused or ejected",
        )

    async def stream(
        self, token_ids: Sequence[int], sampling: Sampling, plan: TransferPlan | None = None
    ) -> AsyncIterator[Generation]:
        t0 = time.perf_counter()
        node, r = await self._post(self._body(token_ids, sampling, plan), plan)
        if r.status_code != 200:
            raise EngineError(
                f"an engine node refused the request (HTTP {r.status_code})",
                detail=f"vllm serve node {r.request.url} answered {r.status_code}: {r.text[:300]}",
            )
        doc = r.json()
        choice = doc["choices"][0]
        usage = doc.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        g = Generation(
            token_ids=list(choice.get("token_ids") or []),
            text=choice.get("text") or "",
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=int(usage.get("prompt_tokens") or len(token_ids)),
            cached_tokens=int(details.get("cached_tokens") or 0),
            ttft_ms=(time.perf_counter() - t0) * 1e3,
        )
        lp = choice.get("logprobs")
        if lp and lp.get("top_logprobs"):
            g.logprobs = [  # keys are "token_id:<id>" (return_tokens_as_token_ids)
                {int(tok.rsplit(":", 1)[1]): v for tok, v in d.items()}
                for d in lp["top_logprobs"]
                if d
            ]
        kvp = doc.get("kv_transfer_params") or {}
        g.connector = dict(kvp.get("kvaas") or {})
        observe_load_report(g.connector)
        if plan is not None and plan.op == "load":
            _count_attach(node.url, g)
        yield g


def _count_attach(url: str, g: Generation) -> None:
    """Count an attach's tokens by source for ``url`` (see :data:`ATTACH_TOKENS`)."""
    report = g.connector
    ATTACH_TOKENS.labels(url, "prompt").inc(g.prompt_tokens)
    ATTACH_TOKENS.labels(url, "cached").inc(g.cached_tokens)
    stored = report.get("matched_tokens")
    if isinstance(stored, int) and stored > 0:
        ATTACH_TOKENS.labels(url, "stored").inc(stored)
    memory = report.get("memory_tokens")
    if isinstance(memory, int) and memory > 0:
        ATTACH_TOKENS.labels(url, "memory").inc(memory)
