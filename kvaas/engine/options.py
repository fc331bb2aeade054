"""The options of one vLLM engine with the KVaaS connector: the same whether it runs in the
gateway's process (:class:`kvaas.engine.inprocess.InProcessEngine`) or as a remote node
(:func:`kvaas.engine.node_command.serve_command`), read from the settings in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from kvaas.codec.sizing import KVDtype
from kvaas.engine.device import Eager
from kvaas.engine.ipc_wait import SPIN_ENV
from kvaas.engine.priorities import (
    DEFAULT_BULK_STEP_MS,
    DEFAULT_BULK_STEP_TOKENS,
    DEFAULT_INTERACTIVE_GRACE_MS,
    DEFAULT_MAX_HOLD_S,
)
from kvaas.engine.priorities import options as scheduler_options

if TYPE_CHECKING:
    from kvaas.config import Settings


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """vLLM's options (model length, batching, prefix caching, KV memory, parallelism, eager
    mode), the fair step scheduler's (:mod:`kvaas.engine.scheduler`), the queue-wait plugin's
    (:mod:`kvaas.engine.ipc_wait`) and the connector's (:func:`kvaas.connector.transfer_config`;
    ``None``: the connector's default). Each field is the setting of the same meaning (see
    :meth:`from_settings`)."""

    dtype: KVDtype | Literal["auto"] = "auto"
    max_model_len: int = 4096
    max_num_batched_tokens: int = 2048
    prefill_chunk_tokens: int = 0
    bulk_step_tokens: int = DEFAULT_BULK_STEP_TOKENS
    bulk_step_ms: float = DEFAULT_BULK_STEP_MS
    bulk_max_hold_s: float = DEFAULT_MAX_HOLD_S
    interactive_grace_ms: float = DEFAULT_INTERACTIVE_GRACE_MS
    ipc_spin_s: float | None = None
    presence_ttl_s: float | None = None
    save_queue_bytes: int | None = None
    decoded_bytes: int | None = None
    layerwise_loads: bool | None = None
    warm_on_save: bool | None = None
    prefix_caching: bool = True
    kv_cache_gib: float = 1.0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    eager: Eager = "auto"
    gpu_memory_fraction: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings, dtype: KVDtype | Literal["auto"]) -> EngineOptions:
        """The options ``settings`` give (``KVAAS_ENGINE_*``, ``KVAAS_CONNECTOR_*``), with the
        engine's ``dtype`` resolved by the caller (it depends on the model and the device)."""
        s = settings
        return cls(
            dtype=dtype,
            max_model_len=s.engine_max_model_len,
            max_num_batched_tokens=s.engine_max_batched_tokens,
            prefill_chunk_tokens=s.engine_prefill_chunk_tokens,
            bulk_step_tokens=s.engine_bulk_step_tokens,
            bulk_step_ms=s.engine_bulk_step_ms,
            bulk_max_hold_s=s.engine_bulk_max_hold_seconds,
            interactive_grace_ms=s.engine_interactive_grace_ms,
            ipc_spin_s=s.engine_ipc_spin_seconds,
            presence_ttl_s=s.connector_presence_ttl_seconds,
            save_queue_bytes=s.connector_save_queue_bytes,
            decoded_bytes=s.connector_decoded_bytes,
            layerwise_loads=s.connector_layerwise_loads,
            warm_on_save=s.connector_warm_on_save,
            prefix_caching=s.engine_prefix_caching,
            kv_cache_gib=s.engine_kv_cache_gib,
            tensor_parallel_size=s.engine_tensor_parallel_size,
            pipeline_parallel_size=s.engine_pipeline_parallel_size,
            eager=s.engine_eager,
            gpu_memory_fraction=s.engine_gpu_memory_fraction,
        )

    @property
    def world(self) -> tuple[int, int]:
        """Workers: tensor x pipeline parallel."""
        return (self.tensor_parallel_size, self.pipeline_parallel_size)

    def scheduler_config(self) -> dict[str, dict[str, float]]:
        """vLLM's ``additional_config`` for the fair step scheduler."""
        return scheduler_options(
            self.bulk_step_tokens,
            self.bulk_max_hold_s,
            self.bulk_step_ms,
            self.interactive_grace_ms,
        )

    def environment(self) -> dict[str, str]:
        """Variables the engine's processes read from their environment: the queue-wait
        window (:data:`kvaas.engine.ipc_wait.SPIN_ENV`) when one is set."""
        if self.ipc_spin_s is None:
            return {}
        return {SPIN_ENV: repr(self.ipc_spin_s)}

    def connector_options(self) -> dict[str, Any]:
        """The connector's keyword options of :func:`kvaas.connector.transfer_config`."""
        return {
            "presence_ttl_s": self.presence_ttl_s,
            "save_queue_bytes": self.save_queue_bytes,
            "decoded_bytes": self.decoded_bytes,
            "layerwise_loads": self.layerwise_loads,
            "warm_on_save": self.warm_on_save,
        }
