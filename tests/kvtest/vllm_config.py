"""The parts of vLLM's ``VllmConfig`` the KVaaS connector reads, for connector tests on CPU
tensors: a CPU attention backend per layer, the model's KV heads and head size, the block size
and the connector's ``kv_transfer_config``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend


def layer_names(layers: int) -> list[str]:
    """The attention layer names of a ``layers``-layer model, as vLLM registers them."""
    return [f"model.layers.{i}.self_attn.attn" for i in range(layers)]


def connector_config(
    transfer: dict[str, Any], *, layers: int, heads: int, dim: int, block: int
) -> Any:
    """A stand-in for ``VllmConfig`` with ``transfer`` (what
    :func:`kvaas.connector.transfer_config` returns) as its ``kv_transfer_config``."""
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(**transfer),
        cache_config=SimpleNamespace(block_size=block, cache_dtype="auto"),
        model_config=SimpleNamespace(
            get_num_kv_heads=lambda _p: heads, get_head_size=lambda: dim, use_mla=False
        ),
        parallel_config=SimpleNamespace(),
        compilation_config=SimpleNamespace(
            static_forward_context={
                n: SimpleNamespace(get_attn_backend=lambda: CPUAttentionBackend)
                for n in layer_names(layers)
            }
        ),
    )
