"""Copies between vLLM's paged per-layer KV tensors and contiguous token-major KV.

Supported per-layer layouts (detected from the tensor's shape):

- ``cpu``: ``[num_blocks, kv_heads, block_size, 2 * head_dim]``, read by the CPU attention
  backend as ``[num_blocks, kv_heads, 2 * block_size, head_dim]`` with keys in rows
  ``0..block_size-1`` and values in rows ``block_size..2*block_size-1`` of each block.
- ``kv_first``: ``[2, num_blocks, block_size, kv_heads, head_dim]`` (FlashAttention on GPUs).
- ``block_first``: ``[num_blocks, 2, block_size, kv_heads, head_dim]`` (FlashInfer on GPUs).

A token at absolute position ``p`` of a request lives in block ``block_ids[p // block_size]``
at offset ``p % block_size``. Every copy is one vectorised index operation per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PagedLayout:
    kind: str
    block_size: int
    kv_heads: int
    head_dim: int

    @classmethod
    def detect(cls, t: torch.Tensor, block_size: int, kv_heads: int, head_dim: int) -> PagedLayout:
        s = tuple(t.shape)
        if len(s) == 4 and s[1:] == (kv_heads, block_size, 2 * head_dim):
            return cls("cpu", block_size, kv_heads, head_dim)
        if len(s) == 5 and s[0] == 2 and s[2:] == (block_size, kv_heads, head_dim):
            return cls("kv_first", block_size, kv_heads, head_dim)
        if len(s) == 5 and s[1] == 2 and s[2:] == (block_size, kv_heads, head_dim):
            return cls("block_first", block_size, kv_heads, head_dim)
        raise ValueError(
            f"unsupported paged KV layout {list(s)} (block_size={block_size}, "
            f"kv_heads={kv_heads}, head_dim={head_dim})"
        )


def slots(
    block_ids: Sequence[int] | torch.Tensor, start: int, end: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block index, offset) of token positions ``start..end-1``."""
    pos = torch.arange(start, end)
    table = torch.as_tensor(block_ids, dtype=torch.long)
    return table[pos // block_size], pos % block_size


def gather(
    layer: torch.Tensor, layout: PagedLayout, blk: torch.Tensor, off: torch.Tensor
) -> torch.Tensor:
    """Keys and values of the given slots as ``[2, n, kv_heads, head_dim]``."""
    if layout.kind == "cpu":
        v = layer.view(layer.shape[0], layout.kv_heads, 2 * layout.block_size, layout.head_dim)
        k_ = v[blk, :, off]  # [n, H, D]
        v_ = v[blk, :, off + layout.block_size]
        return torch.stack([k_, v_])
    if layout.kind == "kv_first":
        return torch.stack([layer[0, blk, off], layer[1, blk, off]])
    return torch.stack([layer[blk, 0, off], layer[blk, 1, off]])


def scatter(
    layer: torch.Tensor, layout: PagedLayout, blk: torch.Tensor, off: torch.Tensor, kv: torch.Tensor
) -> None:
    """Write ``kv`` (``[2, n, kv_heads, head_dim]``) into the given slots, in place."""
    kv = kv.to(device=layer.device, dtype=layer.dtype)
    if layout.kind == "cpu":
        v = layer.view(layer.shape[0], layout.kv_heads, 2 * layout.block_size, layout.head_dim)
        v[blk, :, off] = kv[0]
        v[blk, :, off + layout.block_size] = kv[1]
    elif layout.kind == "kv_first":
        layer[0, blk, off] = kv[0]
        layer[1, blk, off] = kv[1]
    else:
        layer[blk, 0, off] = kv[0]
        layer[blk, 1, off] = kv[1]
