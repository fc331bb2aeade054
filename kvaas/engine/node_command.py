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
from kvaas.engine.device import Eager, eager, memory_args
from kvaas.engine.ipc_wait import SPIN_ENV
from kvaas.engine.priorities import DEFAULT_BULK_STEP_TOKENS, DEFAULT_MAX_HOLD_S, SCHEDULER_CLS
from kvaas.engine.priorities import options as scheduler_options


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
    dtype: str = "auto",
    max_model_len: int = 4096,
    max_num_batched_tokens: int = 2048,
    prefill_chunk_tokens: int = 0,
    bulk_step_tokens: int = DEFAULT_BULK_STEP_TOKENS,
    bulk_max_hold_s: float = DEFAULT_MAX_HOLD_S,
    ipc_spin_s: float | None = None,
    presence_ttl_s: float | None = None,
    save_queue_bytes: int | None = None,
    decoded_bytes: int | None = None,
    layerwise_loads: bool | None = None,
    warm_on_save: bool | None = None,
    prefix_caching: bool = True,
    kv_cache_gib: float = 1.0,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    device: Literal["cpu", "gpu"] = "cpu",
    eager_mode: Eager = "auto",
    gpu_memory_fraction: float | None = None,
) -> NodeCommand:
    """The command of one remote engine node on the store ``store``
    (``StoreConfig.to_dict()``), requiring ``api_key`` (``None``: none) of its clients:
    :mod:`kvaas.engine.node`, which runs vLLM's OpenAI server module (``vllm serve`` under
    another name, which also works with the CPU package, whose ``vllm`` launcher looks for a
    distribution named ``vllm``) and reports the model's fingerprint. Its paged KV gets
    ``kv_cache_gib`` GiB (``--kv-cache-memory-bytes``, honoured on CPU and GPU), so it starts on
    a machine where other processes run. The node runs the fair step scheduler
    (:mod:`kvaas.engine.scheduler`, with vLLM's ``priority`` policy) that the gateway's request
    priorities need. The store's Redis URL and the key go in :attr:`NodeCommand.env`, never in
    its argv. ``device`` is the node's (``eager_mode`` ``auto``: eager on a CPU only;
    ``gpu_memory_fraction`` on a GPU replaces the KV cache size, see
    :mod:`kvaas.engine.device`). A node of several workers (``tensor_parallel_size`` x
    ``pipeline_parallel_size``) reports that world to the gateway, which refuses another."""
    env: dict[str, str] = {}
    if store.get("redis_url"):
        env[REDIS_URL_ENV] = str(store["redis_url"])
    if api_key:
        env["VLLM_API_KEY"] = api_key
    if ipc_spin_s is not None:  # read by vLLM's processes (kvaas.engine.ipc_wait)
        env[SPIN_ENV] = repr(ipc_spin_s)
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
        "--scheduling-policy",
        "priority",
        "--scheduler-cls",
        SCHEDULER_CLS,
        "--additional-config",
        json.dumps(scheduler_options(bulk_step_tokens, bulk_max_hold_s)),
        *_memory_flags(kv_cache_gib, gpu_memory_fraction, device == "gpu"),
        *(["--enforce-eager"] if eager(eager_mode, device == "gpu") else []),
        "--enable-prompt-tokens-details",
        "--kv-transfer-config",
        json.dumps(
            transfer_config(
                store,
                redis_url_env=REDIS_URL_ENV,
                presence_ttl_s=presence_ttl_s,
                save_queue_bytes=save_queue_bytes,
                decoded_bytes=decoded_bytes,
                layerwise_loads=layerwise_loads,
                warm_on_save=warm_on_save,
            )
        ),
    ]
    if not prefix_caching:
        cmd.append("--no-enable-prefix-caching")
    if tensor_parallel_size > 1:
        cmd += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if pipeline_parallel_size > 1:
        cmd += ["--pipeline-parallel-size", str(pipeline_parallel_size)]
    return NodeCommand(cmd, env)
