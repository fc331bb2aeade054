"""How to start one remote engine node: the command ``kvaas engine command`` prints.

A node is vLLM's OpenAI server (:mod:`kvaas.engine.node`) with the KVaaS connector on the
deployment's store and the fair step scheduler (:mod:`kvaas.engine.scheduler`) that the
gateway's request priorities need; its secrets travel in its environment, never on its
command line. The gateway's side of the pool is :mod:`kvaas.engine.remote`.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any, Literal

from kvaas.connector import REDIS_URL_ENV, transfer_config
from kvaas.engine.device import eager, memory_args
from kvaas.engine.options import EngineOptions
from kvaas.engine.priorities import SCHEDULER_CLS


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


def _memory_flags(kv_cache_gib: float, fraction: float | None, gpu: bool) -> list[str]:
    """The command-line form of :func:`kvaas.engine.device.memory_args`."""
    flags: list[str] = []
    for name, value in memory_args(kv_cache_gib, fraction, gpu).items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def serve_command(
    model_dir: str,
    name: str,
    store: dict[str, Any],
    *,
    port: int,
    api_key: str | None = None,
    options: EngineOptions | None = None,
    device: Literal["cpu", "gpu"] = "cpu",
) -> NodeCommand:
    """The command of one remote engine node on the store ``store``
    (``StoreConfig.to_dict()``), requiring ``api_key`` (``None``: none) of its clients:
    :mod:`kvaas.engine.node`, which runs vLLM's OpenAI server module (``vllm serve`` under
    another name, which also works with the CPU package, whose ``vllm`` launcher looks for a
    distribution named ``vllm``) and reports the model's fingerprint. Its paged KV gets
    ``options.kv_cache_gib`` GiB (``--kv-cache-memory-bytes``, honoured on CPU and GPU), so it
    starts on a machine where other processes run. The node runs the fair step scheduler
    (:mod:`kvaas.engine.scheduler`, with vLLM's ``priority`` policy) that the gateway's request
    priorities need. The store's Redis URL and the key go in :attr:`NodeCommand.env`, never in
    its argv. ``options`` are the engine's (:class:`~kvaas.engine.options.EngineOptions`, the
    in-process engine's too); ``device`` is the node's (eager mode ``auto``: eager on a CPU
    only; ``gpu_memory_fraction`` on a GPU replaces the KV cache size, see
    :mod:`kvaas.engine.device`). A node of several workers (tensor x pipeline parallel)
    reports that world to the gateway, which refuses another."""
    o = options or EngineOptions()
    env: dict[str, str] = {}
    if store.get("redis_url"):
        env[REDIS_URL_ENV] = str(store["redis_url"])
    if api_key:
        env["VLLM_API_KEY"] = api_key
    env |= o.environment()  # read by vLLM's processes
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
        o.dtype,
        "--max-model-len",
        str(o.max_model_len),
        "--max-num-batched-tokens",
        str(o.max_num_batched_tokens),
        "--long-prefill-token-threshold",
        str(o.prefill_chunk_tokens),
        "--scheduling-policy",
        "priority",
        "--scheduler-cls",
        SCHEDULER_CLS,
        "--additional-config",
        json.dumps(o.scheduler_config()),
        *_memory_flags(o.kv_cache_gib, o.gpu_memory_fraction, device == "gpu"),
        *(["--enforce-eager"] if eager(o.eager, device == "gpu") else []),
        "--enable-prompt-tokens-details",
        "--kv-transfer-config",
        json.dumps(transfer_config(store, redis_url_env=REDIS_URL_ENV, **o.connector_options())),
    ]
    if not o.prefix_caching:
        cmd.append("--no-enable-prefix-caching")
    if o.tensor_parallel_size > 1:
        cmd += ["--tensor-parallel-size", str(o.tensor_parallel_size)]
    if o.pipeline_parallel_size > 1:
        cmd += ["--pipeline-parallel-size", str(o.pipeline_parallel_size)]
    return NodeCommand(cmd, env)
