"""Copies between vLLM's paged per-layer KV tensors and contiguous token-major KV.

vLLM (0.32) gives every attention backend the same logical per-layer tensor
``[kernel_blocks, kv_heads, kernel_block_size, 2 * head_dim]``; the backends differ in where
keys and values sit inside it (the *placement*) and in the tensor's strides (NHD or HND, layer-
or block-outermost: the physical order), never in the shape. The placement is therefore taken
from the attention backend, not guessed from the shape:

- ``rows`` (``CPU_ATTN``): the backend views each block's ``[block, 2 * head_dim]`` interior as
  ``[2 * block, head_dim]``; keys are rows ``0..block-1`` and values rows
  ``block..2*block-1``. This needs each head's interior to be dense, which is checked.
- ``split`` (``FLASH_ATTN``, ``TRITON_ATTN``, ``FLEX_ATTENTION``, ``FLASHINFER``): the last
  axis is split: keys are ``[..., :head_dim]``, values ``[..., head_dim:]``, with any strides.

Kernel-block splitting: when the backend's kernel block is smaller than the engine's block
(``block_size = ratio * kernel_block_size``), the tensor holds ``num_blocks * ratio`` kernel
blocks and engine block ``b`` is kernel blocks ``b * ratio .. b * ratio + ratio - 1``.

A token at absolute position ``p`` of a request lives in engine block
``block_ids[p // block_size]``, in kernel block ``block_ids[p // block_size] * ratio +
(p % block_size) // kernel_block_size`` at offset ``p % kernel_block_size``. Every copy is one
indexed read or write per layer on strided views of the engine's tensor: nothing is reshaped,
so any stride order works. Anything else (another backend, quantized or fp8 caches, MLA's
single latent tensor, a shape that does not match the model) is refused by
:meth:`PagedLayout.for_backend` with a message saying what was found.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Placement = Literal["rows", "split"]

#: K/V placement of each supported vLLM attention backend (``AttentionBackend.get_name()``).
BACKEND_PLACEMENT: dict[str, Placement] = {
    "CPU_ATTN": "rows",
    "FLASH_ATTN": "split",
    "TRITON_ATTN": "split",
    "FLEX_ATTENTION": "split",
    "FLASHINFER": "split",
}
#: KV cache dtypes the connector copies (the model's own: no fp8 or other quantized caches).
KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class LayoutError(ValueError):
    """The engine's KV cache is laid out in a way the connector does not support."""


@dataclass(frozen=True)
class PagedLayout:
    """Where one layer's keys and values live in vLLM's paged KV tensor."""

    placement: Placement
    block_size: int  # tokens per engine block (a block id of the scheduler)
    kernel_block_size: int  # tokens per block of the tensor's first axis
    kv_heads: int
    head_dim: int

    @property
    def ratio(self) -> int:
        """Kernel blocks per engine block."""
        return self.block_size // self.kernel_block_size

    @classmethod
    def for_backend(
        cls, backend: str, t: torch.Tensor, block_size: int, kv_heads: int, head_dim: int
    ) -> PagedLayout:
        """The layout of ``t``, one layer's KV tensor made for attention backend ``backend``.

        Raises :class:`LayoutError` (saying what was found and what is supported) for an
        unknown backend, a quantized or fp8 cache, or a tensor that is not
        ``[blocks * ratio, kv_heads, block_size / ratio, 2 * head_dim]``."""
        placement = BACKEND_PLACEMENT.get(backend)
        if placement is None:
            raise LayoutError(
                f"the KVaaS connector does not support the {backend} attention backend "
                f"(supported: {', '.join(sorted(BACKEND_PLACEMENT))})"
            )
        if t.dtype not in KV_DTYPES:
            raise LayoutError(
                f"the KVaaS connector does not support a {t.dtype} KV cache (fp8 or "
                "quantized caches are refused: use kv_cache_dtype='auto')"
            )
        shape = tuple(t.shape)
        if len(shape) != 4 or shape[1] != kv_heads or shape[3] != 2 * head_dim:
            raise LayoutError(
                f"unsupported paged KV tensor {list(shape)} for {backend}: expected "
                f"[blocks, {kv_heads}, block, {2 * head_dim}] (kv_heads={kv_heads}, "
                f"head_dim={head_dim})"
            )
        kernel = shape[2]
        if kernel < 1 or block_size % kernel or shape[0] % (block_size // kernel):
            raise LayoutError(
                f"paged KV tensor {list(shape)} does not split engine blocks of {block_size} "
                "tokens into whole kernel blocks"
            )
        if placement == "rows" and (t.stride(3) != 1 or t.stride(2) != shape[3]):
            raise LayoutError(
                f"{backend} needs each head's block interior dense, got strides "
                f"{list(t.stride())} for {list(shape)}"
            )
        return cls(placement, block_size, kernel, kv_heads, head_dim)

    def keys_values(self, layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of ``layer``'s keys and values, each ``[kernel_blocks, kv_heads,
        kernel_block_size, head_dim]`` (strided views of the same storage: writes land in
        ``layer``)."""
        d = self.head_dim
        if self.placement == "split":
            return layer[..., :d], layer[..., d:]
        b, h, n, _ = layer.shape
        rows = layer.as_strided(
            (b, h, 2 * n, d), (layer.stride(0), layer.stride(1), d, 1), layer.storage_offset()
        )
        return rows[:, :, :n], rows[:, :, n:]


def slots(
    block_ids: Sequence[int] | torch.Tensor, start: int, end: int, layout: PagedLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel block index, offset) of token positions ``start..end-1`` of a request whose
    engine blocks are ``block_ids``."""
    pos = torch.arange(start, end)
    table = torch.as_tensor(block_ids, dtype=torch.long)
    within = pos % layout.block_size
    blk = table[pos // layout.block_size] * layout.ratio + within // layout.kernel_block_size
    return blk, within % layout.kernel_block_size


def gather(
    kv_views: tuple[torch.Tensor, torch.Tensor], blk: torch.Tensor, off: torch.Tensor
) -> torch.Tensor:
    """Keys and values of the given slots as ``[2, n, kv_heads, head_dim]`` (a copy)."""
    k, v = kv_views
    return torch.stack([k[blk, :, off], v[blk, :, off]])


def scatter(
    kv_views: tuple[torch.Tensor, torch.Tensor],
    blk: torch.Tensor,
    off: torch.Tensor,
    kv: torch.Tensor,
) -> None:
    """Write ``kv`` (``[2, n, kv_heads, head_dim]``) into the given slots, in place."""
    k, v = kv_views
    kv = kv.to(device=k.device, dtype=k.dtype)
    k[blk, :, off] = kv[0]
    v[blk, :, off] = kv[1]
