"""What the connector checks about the engine it runs in, once, at start-up.

The paged copies are only correct on layouts the connector knows (see
:mod:`kvaas.connector.paged`), and stored chunks are only interchangeable between workers
holding the same share of the KV. Both are decided here from vLLM's configuration and KV
tensors; anything else raises :class:`~kvaas.connector.paged.LayoutError` and the engine does
not start (a clear refusal rather than corrupt or crashing loads later).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from kvaas.connector.paged import LayoutError, PagedLayout
from kvaas.store.keys import ShardRank

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def attn_backend_name(vllm_config: VllmConfig, layer_name: str) -> str:
    """The attention backend (``AttentionBackend.get_name()``) of layer ``layer_name``; raises
    :class:`LayoutError` when the engine does not say (the K/V placement depends on it)."""
    ctx = getattr(vllm_config.compilation_config, "static_forward_context", None) or {}
    layer = ctx.get(layer_name)
    get_backend = getattr(layer, "get_attn_backend", None)
    if get_backend is None:
        raise LayoutError(f"cannot tell the attention backend of KV cache layer {layer_name}")
    return str(get_backend().get_name())


def shard_rank(vllm_config: VllmConfig) -> ShardRank:
    """This worker's tensor- and pipeline-parallel rank (vLLM orders a worker's ``rank`` as
    ``pp_rank * tp_size + tp_rank``); raises :class:`LayoutError` for context parallelism,
    which splits a request's tokens across ranks (not supported)."""
    pc = vllm_config.parallel_config
    for name in ("prefill_context_parallel_size", "decode_context_parallel_size"):
        if int(getattr(pc, name, 1)) != 1:
            raise LayoutError(f"the KVaaS connector does not support {name} > 1")
    tp = int(getattr(pc, "tensor_parallel_size", 1))
    pp = int(getattr(pc, "pipeline_parallel_size", 1))
    rank = int(getattr(pc, "rank", 0)) % (tp * pp)
    return ShardRank(rank % tp, tp, rank // tp, pp)


def resolve_layout(
    vllm_config: VllmConfig,
    kv_cache_config: Any,
    layers: Sequence[tuple[str, torch.Tensor]],
    kv_heads: int,
    head_dim: int,
) -> PagedLayout:
    """The one layout of every layer in ``layers`` (name, KV tensor); raises
    :class:`LayoutError` on MLA, an fp8 or quantized cache, several KV cache groups, an
    unknown attention backend, an unexpected shape or layers that differ."""
    if getattr(vllm_config.model_config, "use_mla", False):
        raise LayoutError("the KVaaS connector does not support MLA models")
    cache_dtype = getattr(vllm_config.cache_config, "cache_dtype", "auto")
    if str(cache_dtype) != "auto":
        raise LayoutError(
            f"the KVaaS connector does not support kv_cache_dtype={cache_dtype!r} "
            "(use 'auto': the model's dtype)"
        )
    groups = getattr(kv_cache_config, "kv_cache_groups", None)
    if groups is not None and len(groups) > 1:
        raise LayoutError(
            f"the KVaaS connector supports one KV cache group, the engine has {len(groups)}"
        )
    if not layers:
        raise LayoutError("the engine registered no KV cache layers")
    block_size = vllm_config.cache_config.block_size
    layouts = {
        PagedLayout.for_backend(
            attn_backend_name(vllm_config, name), t, block_size, kv_heads, head_dim
        )
        for name, t in layers
    }
    if len(layouts) != 1:
        raise LayoutError(f"the KV cache layers differ in layout: {sorted(map(str, layouts))}")
    return layouts.pop()
