"""Decoding loaded chunks for one worker's paged KV, trusting nothing in the blobs.

A chunk that opened under the tenant's key was written by someone holding that key, which
proves nothing about its contents: its header may name another model's shape, another chunk
size, or dimensions its payload cannot hold. :func:`decode_fitting` checks each header against
the destination before decoding (so nothing is allocated from a header that does not fit) and
stops at the first chunk that does not fit or does not decode; the caller loads the chunks
before it and reports the rest as failed loads, which vLLM recomputes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvaas import codec


@dataclass(frozen=True, slots=True)
class ChunkShape:
    """What every chunk copied into a worker's paged KV must be: its canonical shape
    ``[layers, 2, tokens, kv_heads, head_dim]`` and dtype."""

    num_layers: int
    num_tokens: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_tokens, self.kv_heads, self.head_dim)

    def mismatch(self, header: codec.BlobHeader) -> str | None:
        """Why a blob with ``header`` does not fit, or ``None`` when it does."""
        if header.shape != self.shape or header.dtype != self.dtype:
            return (
                f"chunk is {list(header.shape)} {header.dtype}, the engine needs "
                f"{list(self.shape)} {self.dtype}"
            )
        return None


def decode_fitting(
    blobs: Sequence[bytes], expected: ChunkShape
) -> tuple[list[torch.Tensor], str | None]:
    """The decoded leading ``blobs`` that fit ``expected``, and why the next one was refused
    (``None`` when all were decoded). Never raises: a hostile blob ends the prefix."""
    out: list[torch.Tensor] = []
    for i, blob in enumerate(blobs):
        try:
            why = expected.mismatch(codec.inspect(blob))
            if why is None:
                kv = codec.decode(blob)
                if kv.shape != expected.shape or kv.dtype != expected.dtype:
                    why = "decoded chunk does not have its header's shape"
        except Exception as e:  # a chunk's bytes must never crash the worker
            why = f"{type(e).__name__}: {e}"
        if why is not None:
            return out, f"chunk {i}: {why}"
        out.append(kv)
    return out, None
