"""Engines: what runs the model (in-process vLLM or remote ``vllm serve`` nodes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvaas.codec.sizing import kv_dtype
from kvaas.engine.base import Degraded, Engine, EngineError, Generation, Liveness, Sampling
from kvaas.engine.device import engine_dtype, on_gpu
from kvaas.engine.model_info import ModelInfo
from kvaas.engine.options import EngineOptions

if TYPE_CHECKING:
    from kvaas.config import Settings

__all__ = [
    "Degraded",
    "Engine",
    "EngineError",
    "EngineOptions",
    "Generation",
    "Liveness",
    "ModelInfo",
    "Sampling",
    "build_engine",
    "kv_dtype",
]


def build_engine(settings: Settings) -> Engine | None:
    """The engine the settings ask for (``None`` for ``KVAAS_ENGINE=none``); not started."""
    if settings.engine == "none":
        return None
    from kvaas.model_presets import resolve_model
    from kvaas.store.factory import StoreConfig

    model_dir = resolve_model(settings.model, settings.data_dir)
    name = settings.model if "/" not in settings.model else model_dir.name
    # in process, ``auto`` runs a float32 checkpoint as bfloat16 on a GPU; remote nodes run the
    # dtype the settings name (the node command prints it: the gateway cannot see their GPUs)
    gpu = settings.engine == "inprocess" and on_gpu()
    dtype = engine_dtype(model_dir, settings.engine_dtype, gpu)
    info = ModelInfo.load(model_dir, name, dtype)
    if settings.engine == "remote":
        from kvaas.engine.remote import RemoteEngine

        key = settings.engine_api_key
        return RemoteEngine(
            info,
            settings.engine_urls,
            api_key=key.get_secret_value() if key else None,
            timeout_s=settings.engine_request_timeout_seconds,
            max_failures=settings.engine_node_max_failures,
            cooldown_s=settings.engine_node_cooldown_seconds,
            probe_every_s=settings.engine_node_probe_seconds,
            routing=settings.engine_routing,
            node_max_inflight=settings.engine_node_max_inflight,
            node_weights=settings.engine_node_weights,
            route_capacity=settings.engine_route_capacity,
            route_imbalance=settings.engine_route_imbalance,
            route_prefix_imbalance=settings.engine_route_prefix_imbalance,
            hot_rate_per_s=settings.engine_hot_cache_rate,
            hot_replicas=settings.engine_hot_cache_nodes,
            world=(settings.engine_tensor_parallel_size, settings.engine_pipeline_parallel_size),
        )
    from kvaas.engine.inprocess import InProcessEngine

    return InProcessEngine(
        info,
        store=StoreConfig.from_settings(settings).to_dict(),
        options=EngineOptions.from_settings(settings, dtype),
        timeout_s=settings.engine_request_timeout_seconds,
        restart_attempts=settings.engine_restart_attempts,
    )
