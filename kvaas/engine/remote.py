"""A pool of ``vllm serve`` nodes started with the KVaaS connector, reached over HTTP.

Start each node with (``kvaas engine command`` prints it for the current settings)::

    KVAAS_REDIS_URL=<redis url> VLLM_API_KEY=<KVAAS_ENGINE_API_KEY> \\
    python -m vllm.entrypoints.openai.api_server --model <model dir> \\
        --served-model-name <name> --enforce-eager \\
        --enable-prompt-tokens-details \\
        --kv-transfer-config '{"kv_connector": "KVaaSConnector",
                               "kv_connector_module_path": "kvaas.connector.connector",
                               "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                               "kv_connector_extra_config": {"store": {...},
                                   "redis_url_env": "KVAAS_REDIS_URL"}}'

Secrets travel in the node's environment, never on its command line (which every local user
can read): the connector reads the store's Redis URL from ``KVAAS_REDIS_URL``, and vLLM's server
requires ``VLLM_API_KEY`` as a bearer token on its ``/v1`` routes. The gateway sends
``KVAAS_ENGINE_API_KEY`` as that token on every request (health probes included).

The nodes must share the store's Redis and/or disk directory with the gateway. Requests go to
the node with the fewest requests in flight; the plan travels as ``kv_transfer_params``.
A remote request's completion arrives as one delta when it is done. Errors name no node:
its URL and answer are in :attr:`~kvaas.engine.base.EngineError.detail`, for the log.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from kvaas.connector.params import TransferPlan
from kvaas.engine.base import Engine, EngineError, Generation, Sampling
from kvaas.engine.model_info import ModelInfo


class RemoteEngine(Engine):
    """Round-robin by load over ``urls`` (base URLs of ``vllm serve`` nodes)."""

    def __init__(
        self,
        model: ModelInfo,
        urls: Sequence[str],
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        """``api_key``: the nodes' ``VLLM_API_KEY``, sent as a bearer token on every request
        (``None``: nodes that accept anyone)."""
        if not urls:
            raise ValueError("a remote engine needs at least one URL")
        self.model = model
        self._urls = [u.rstrip("/") for u in urls]
        self._inflight = dict.fromkeys(self._urls, 0)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=5.0), headers=headers
        )
        self._max_model_len = 0

    @property
    def block_size(self) -> int:
        return 0  # not reported by the server; the connector aligns loads itself

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    async def start(self) -> None:
        for url in self._urls:
            try:
                r = await self._client.get(f"{url}/v1/models")
                r.raise_for_status()
                for m in r.json().get("data", []):
                    self._max_model_len = max(self._max_model_len, int(m.get("max_model_len") or 0))
            except (httpx.HTTPError, ValueError):
                continue  # a node that is down now may come back; health() reports it
        if not self._max_model_len:
            self._max_model_len = 4096

    async def shutdown(self) -> None:
        await self._client.aclose()

    async def health(self) -> str:
        up = 0
        down: list[str] = []
        for url in self._urls:
            try:
                r = await self._client.get(f"{url}/health", timeout=3.0)
                up += r.status_code == 200
                if r.status_code != 200:
                    down.append(f"{url} answered {r.status_code}")
            except httpx.HTTPError as e:
                down.append(f"{url}: {type(e).__name__}: {e}")
        if not up:
            raise EngineError(
                f"no vllm serve node answers ({len(self._urls)} configured)",
                detail="; ".join(down),
            )
        return f"{up}/{len(self._urls)} vllm serve nodes up"

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

    async def stream(
        self, token_ids: Sequence[int], sampling: Sampling, plan: TransferPlan | None = None
    ) -> AsyncIterator[Generation]:
        url = min(self._urls, key=lambda u: self._inflight[u])
        self._inflight[url] += 1
        t0 = time.perf_counter()
        try:
            r = await self._client.post(
                f"{url}/v1/completions", json=self._body(token_ids, sampling, plan)
            )
        except httpx.HTTPError as e:
            raise EngineError(
                "an engine node did not answer",
                detail=f"vllm serve node {url} failed: {type(e).__name__}: {e}",
            ) from e
        finally:
            self._inflight[url] -= 1
        if r.status_code != 200:
            raise EngineError(
                f"an engine node refused the request (HTTP {r.status_code})",
                detail=f"vllm serve node {url} answered {r.status_code}: {r.text[:300]}",
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
    prefix_caching: bool = True,
) -> NodeCommand:
    """The command of one remote engine node on the store ``store``
    (``StoreConfig.to_dict()``), requiring ``api_key`` (``None``: none) of its clients: vLLM's
    OpenAI server module, which is ``vllm serve`` under another name and also works with the
    CPU package (whose ``vllm`` launcher looks for a distribution named ``vllm``). The store's
    Redis URL and the key go in :attr:`NodeCommand.env`, never in its argv."""
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
        "vllm.entrypoints.openai.api_server",
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
        "--enforce-eager",
        "--enable-prompt-tokens-details",
        "--kv-transfer-config",
        json.dumps(transfer_config(store, redis_url_env=REDIS_URL_ENV)),
    ]
    if not prefix_caching:
        cmd.append("--no-enable-prefix-caching")
    return NodeCommand(cmd, env)
