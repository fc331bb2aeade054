"""What the engine's device changes: compilation, dtype and memory on a GPU against a CPU.

One rule each, used by the in-process engine and the printed node command:

- **eager mode** (:func:`eager`): ``auto`` runs eagerly on a CPU (vLLM's CPU backend gains
  little from compilation and pays seconds of start-up) and compiled with CUDA graphs on a GPU,
  where the per-step launch overhead they remove is most of a small model's step;
- **dtype** (:func:`engine_dtype`): ``auto`` keeps the checkpoint's dtype, except that a float32
  checkpoint runs as bfloat16 on a GPU (half the memory and the bandwidth per token, tensor
  cores). The KV dtype is part of the model fingerprint, so caches made at one dtype are never
  loaded into the other;
- **memory** (:func:`memory_args`): the KV cache gets ``kv_cache_gib`` GiB
  (``kv_cache_memory_bytes``, honoured on CPU and GPU) unless a GPU memory fraction is set
  (``gpu_memory_utilization``: vLLM sizes the KV cache from what the weights and activations
  leave of that fraction).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from kvaas.codec.sizing import KVDtype, kv_dtype

Eager = Literal["auto", "on", "off"]


def on_gpu() -> bool:
    """Whether this process sees a CUDA device (the in-process engine would run there)."""
    import torch

    return bool(torch.cuda.is_available())


def eager(setting: Eager, gpu: bool) -> bool:
    """Whether the engine runs eagerly (``enforce_eager``): ``on``/``off`` as said, ``auto``
    on a CPU only."""
    return setting == "on" or (setting == "auto" and not gpu)


def engine_dtype(model_dir: Path, setting: str, gpu: bool) -> KVDtype:
    """The dtype the engine runs and keeps KV in: ``setting``, or with ``auto`` the
    checkpoint's, a float32 checkpoint on a GPU as bfloat16. ``ValueError`` for a dtype the
    codec cannot store."""
    dtype = kv_dtype(model_dir, setting)
    if setting == "auto" and gpu and dtype == "float32":
        return "bfloat16"
    return dtype


def memory_args(
    kv_cache_gib: float, gpu_memory_fraction: float | None, gpu: bool
) -> dict[str, Any]:
    """vLLM engine arguments for its memory: the fraction on a GPU when one is set, else the
    KV cache's size in bytes."""
    if gpu and gpu_memory_fraction is not None:
        return {"gpu_memory_utilization": gpu_memory_fraction}
    return {"kv_cache_memory_bytes": int(kv_cache_gib * 1024**3)}
