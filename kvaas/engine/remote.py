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

The nodes must share the store's Redis and/or disk directory with the gateway. Requests go to
the usable node with the fewest requests in flight; the plan travels as ``kv_transfer_params``.
A remote request's completion arrives as one delta when it is done.

Node health: a node is *ejected* (gets no requests) for ``cooldown_s`` after ``max_failures``
consecutive failures (a refused or failed connection, a 5xx or 401 answer, a failed probe);
probes every ``probe_every_s`` check each node's ``/health`` and model fingerprint. A node whose
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
import shlex
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from kvaas.connector.params import TransferPlan
from kvaas.engine.base import Degraded, Engine, EngineError, Generation, Liveness, Sampling
from kvaas.engine.model_info import ModelInfo
from kvaas.engine.node import FINGERPRINT_PATH

log = logging.getLogger("kvaas.engine")

#: time limit of one probe request, in seconds
PROBE_TIMEOUT_S = 3.0


@dataclass
class Node:
    """One ``vllm serve`` node and what the gateway knows of its health."""

    url: str
    inflight: int = 0
    #: consecutive failures (requests and probes); a success resets it
    failures: int = 0
    #: ``time.monotonic()`` until which the node gets no requests
    ejected_until: float = 0.0
    #: why the node is never used (its model fingerprint differs), until a probe clears it
    refused: str | None = None
    last_error: str | None = None

    def usable(self, now: float) -> bool:
        return self.refused is None and now >= self.ejected_until


class RemoteEngine(Engine):
    """Routing by load over the usable ones of ``urls`` (base URLs of ``vllm serve`` nodes),
    with passive ejection and active probes (see the module)."""

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
    ) -> None:
        """``api_key``: the nodes' ``VLLM_API_KEY``, sent as a bearer token on every request
        (``None``: nodes that accept anyone). ``timeout_s``: the longest one request may
        take."""
        if not urls:
            raise ValueError("a remote engine needs at least one URL")
        self.model = model
        self.nodes = [Node(u.rstrip("/")) for u in urls]
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
            if time.monotonic() >= node.ejected_until:
                log.warning(
                    "engine node %s ejected for %g s: %s", node.url, self._cooldown_s, reason
                )
            node.ejected_until = time.monotonic() + self._cooldown_s

    @staticmethod
    def _succeeded(node: Node) -> None:
        node.failures = 0
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
            theirs = r.json().get("fingerprint") if r.status_code == 200 else None
            if theirs != self.model.fingerprint:
                node.refused = (
                    "it reports no model fingerprint (start it with `kvaas engine command`)"
                    if theirs is None
                    else f"its model fingerprint {theirs} is not the gateway's "
                    f"{self.model.fingerprint} (other weights or dtype)"
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
        ``N``; :class:`EngineError` when no node is usable (all ejected or refused)."""
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
        why = f"{refused} refused: model fingerprint differs" if refused else "others failing"
        return Degraded(f"{line} ({why})")

    def _pick(self, tried: set[str]) -> Node | None:
        """The usable node not yet ``tried`` with the fewest requests in flight; when none is
        usable, the unrefused untried one whose ejection ends first (a last try)."""
        now = time.monotonic()
        fresh = [n for n in self.nodes if n.url not in tried and n.refused is None]
        usable = [n for n in fresh if n.usable(now)]
        if usable:
            return min(usable, key=lambda n: n.inflight)
        return min(fresh, key=lambda n: n.ejected_until) if fresh else None

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
        if plan is not None:
            body["kv_transfer_params"] = plan.to_params()
        return body

    async def _post(self, body: dict[str, Any]) -> httpx.Response:
        """POST the completion to a node; on a failed connection (nothing was sent) to the next
        one. The answer, whatever its status; :class:`EngineError` when no node could take it
        or the one that took it failed."""
        tried: set[str] = set()
        errors: list[str] = []
        while (node := self._pick(tried)) is not None:
            tried.add(node.url)
            node.inflight += 1
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
            if r.status_code >= 500 or r.status_code in (401, 403):
                self._failed(node, f"answered {r.status_code}")
            elif r.status_code == 200:
                self._succeeded(node)
            return r
        raise EngineError(
            "no engine node is available",
            detail="; ".join(errors) or "every node is refused or ejected",
        )

    async def stream(
        self, token_ids: Sequence[int], sampling: Sampling, plan: TransferPlan | None = None
    ) -> AsyncIterator[Generation]:
        t0 = time.perf_counter()
        r = await self._post(self._body(token_ids, sampling, plan))
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
        yield g


@dataclass(frozen=True)
class NodeCommand:
    """How to start one remote engine node: its argument list, which holds no secret (every
    local user can read a process's command line), and the environment variables that carry
    the secrets (``KVAAS_REDIS_URL``, ``VLLM_API_KEY``; a process's environment is readable by
    its own user only)."""

    argv: list[str]
    env: dict[str, str]

    def shell(self) -> str:
        """One shell line that starts the node: ``NAME=value ... python -m ...``."""
        assigns = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join([*assigns, shlex.join(self.argv)])


def serve_command(
    model_dir: str,
    name: str,
    store: dict[str, Any],
    *,
    port: int,
    api_key: str | None = None,
    dtype: str = "auto",
    max_model_len: int = 4096,
    max_num_batched_tokens: int = 2048,
    prefill_chunk_tokens: int = 0,
    prefix_caching: bool = True,
    kv_cache_gib: float = 1.0,
) -> NodeCommand:
    """The command of one remote engine node on the store ``store``
    (``StoreConfig.to_dict()``), requiring ``api_key`` (``None``: none) of its clients:
    :mod:`kvaas.engine.node`, which runs vLLM's OpenAI server module (``vllm serve`` under
    another name, which also works with the CPU package, whose ``vllm`` launcher looks for a
    distribution named ``vllm``) and reports the model's fingerprint. Its paged KV gets
    ``kv_cache_gib`` GiB (``--kv-cache-memory-bytes``, honoured on CPU and GPU), so it starts on
    a machine where other processes run. The store's Redis URL and the key go in
    :attr:`NodeCommand.env`, never in its argv."""
    import json

    from kvaas.connector import REDIS_URL_ENV, transfer_config

    env: dict[str, str] = {}
    if store.get("redis_url"):
        env[REDIS_URL_ENV] = str(store["redis_url"])
    if api_key:
        env["VLLM_API_KEY"] = api_key
    cmd = [
        "python",
        "-m",
        "kvaas.engine.node",
        "--model",
        model_dir,
        "--served-model-name",
        name,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--max-num-batched-tokens",
        str(max_num_batched_tokens),
        "--long-prefill-token-threshold",
        str(prefill_chunk_tokens),
        "--kv-cache-memory-bytes",
        str(int(kv_cache_gib * 1024**3)),
        "--enforce-eager",
        "--enable-prompt-tokens-details",
        "--kv-transfer-config",
        json.dumps(transfer_config(store, redis_url_env=REDIS_URL_ENV)),
    ]
    if not prefix_caching:
        cmd.append("--no-enable-prefix-caching")
    return NodeCommand(cmd, env)
