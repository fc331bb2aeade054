"""Decoding a load's chunks straight into vLLM's paged blocks.

One :class:`PagedLoader` per worker, made when the KV caches are registered. A load goes:

1. each chunk's header is checked against the destination (layers, tokens, KV heads, head
   size, dtype: nothing is allocated or written from a header that does not fit), then the
   chunk is decoded (:func:`kvaas.codec.decode_into`, checksum not verified again: the store
   verified it) straight into staging buffers kept by the loader and reused by every load (in
   the engine's dtype on the KV's device, grown to the longest load seen: no per-load
   allocation of the chunk, no ``torch.cat``). Keys are staged ``[layers, kv_heads, tokens,
   head_dim]`` and values ``[layers, tokens, kv_heads, head_dim]`` (the order value codes are
   stored in), each row of ``head_dim`` dense;
2. the staged tokens are written into the request's blocks with one ``index_copy_`` per
   layer for keys and one for values, whole kernel blocks at a time (the staging viewed as
   ``[kernel blocks, kv_heads, kernel_block_size, head_dim]``: no per-token scatter). A range
   that does not start and end on kernel-block boundaries (a chunk size that is not a
   multiple of the block size) falls back to the per-token copy
   (:func:`kvaas.connector.paged.scatter`).

Chunks the worker's pre-decoded tier holds (:mod:`kvaas.connector.decoded`) come first in a
load: each is copied into its staging slice (one ``copy_`` of keys, one of values) instead of
decoded, and the blobs follow.

A load may report each layer as it is written (``on_layer``): the connector's layer-wise
loads (:mod:`kvaas.connector.layerwise`) let that layer's attention start then.

The values written are exactly those of ``codec.decode`` followed by the per-token scatter
(tests compare both on every layout and scheme). Decoding runs on the KV tensor's device:
on a GPU each chunk's compressed payload crosses to it whole, in one non-blocking copy from
pinned host memory, and its codes are unpacked and dequantized there
(:meth:`kvaas.codec.schemes.QuantScheme._tensors`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from kvaas import codec
from kvaas.connector.chunks import ChunkShape
from kvaas.connector.decoded import DecodedChunk
from kvaas.connector.paged import PagedLayout, scatter, slots
from kvaas.connector.timings import StageClock


def _in_use(chunks: Sequence[DecodedChunk]) -> None:
    """Pre-decoded chunks are about to be read by work queued on the current stream: on a GPU,
    their memory is not handed out again before that work has run, even if the pre-decoded
    tier drops them meanwhile (on a CPU a read is done when it returns)."""
    for chunk in chunks:
        if chunk.keys.is_cuda:  # pragma: no cover - needs a GPU
            stream = torch.cuda.current_stream(chunk.keys.device)
            chunk.keys.record_stream(stream)
            chunk.values.record_stream(stream)


@dataclass(frozen=True, slots=True)
class Loaded:
    """What a load wrote: tokens ``[start, end)`` (``end == start``: nothing), why the chunk
    after the last one loaded was refused (``None`` when every chunk was loaded), and how many
    of the blobs given were decoded (the leading ones; pre-decoded chunks not counted)."""

    end: int
    refused: str | None
    blobs_decoded: int = 0


class PagedLoader:
    """Loads chunks into one worker's paged KV tensors (see the module docstring). Not
    thread-safe: one thread at a time uses it (the worker's step thread, or the layer-wise
    loads' thread while a step's loads are in flight)."""

    def __init__(
        self, layout: PagedLayout, kv_views: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        if not kv_views:
            raise ValueError("no KV layers")
        self.layout = layout
        self.kv_views = list(kv_views)
        k0 = self.kv_views[0][0]
        self.dtype, self.device = k0.dtype, k0.device
        self._capacity = 0  # tokens the staging buffers hold
        self._keys = self._values = torch.empty(0, dtype=self.dtype, device=self.device)

    @property
    def staging_bytes(self) -> int:
        """Bytes held by the reused staging buffers."""
        return 2 * self._keys.numel() * self._keys.element_size()

    def _staging(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys ``[layers, kv_heads, tokens, head_dim]`` and values ``[layers, tokens,
        kv_heads, head_dim]``: views of the staging buffers (grown when too short)."""
        lay, n = self.layout, len(self.kv_views)
        if self._capacity < tokens:
            kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
            self._keys = torch.empty(n, lay.kv_heads, tokens, lay.head_dim, **kw)
            self._values = torch.empty(n, tokens, lay.kv_heads, lay.head_dim, **kw)
            self._capacity = tokens
        return self._keys[:, :, :tokens], self._values[:, :tokens]

    def load(
        self,
        blobs: Sequence[bytes],
        expected: ChunkShape,
        first_token: int,
        start: int,
        end: int,
        block_ids: Sequence[int],
        clock: StageClock | None = None,
        decoded: Sequence[DecodedChunk] = (),
        on_layer: Callable[[int], None] | None = None,
        tail: tuple[int, int] | None = None,
    ) -> Loaded:
        """Stage ``decoded`` (pre-decoded chunks from token ``first_token`` on, each fitting
        ``expected``: one copy each), then decode ``blobs`` (the chunks after them, each
        ``expected``, verified by the store), and write tokens ``[start, end)`` of them into
        ``block_ids`` (the request's engine blocks from token 0). Stops at the first blob that
        does not fit or does not decode; never raises for a chunk's contents (a copy that
        cannot address its blocks raises: the caller fails the whole load). ``on_layer(i)`` is
        called once layer ``i``'s tokens are in the blocks, layers in order (not at all when
        nothing is written). ``tail`` (``(i, n)``): the load's chunk ``i`` (pre-decoded ones
        counted first) is a partial chunk of ``n`` tokens, the last of the prompt; every other
        is ``expected``."""
        c = expected.num_tokens
        clock = clock or StageClock()
        nd = len(decoded)
        tail_at, tail_tokens = tail if tail is not None else (-1, c)

        def tokens(chunks: int) -> int:  # tokens held by the load's first ``chunks`` chunks
            return chunks * c - (c - tail_tokens if 0 <= tail_at < chunks else 0)

        _in_use(decoded)
        if nd and not blobs and on_layer is None:  # every chunk pre-decoded: one copy each
            loaded_end = min(end, first_token + tokens(nd))
            if loaded_end > start:
                with clock.time("decoded"):
                    self._copy_decoded(decoded, c, first_token, start, loaded_end, block_ids)
            return Loaded(max(start, loaded_end), None, 0)
        ks, vs = self._staging((nd + len(blobs)) * c)
        if nd:
            with clock.time("decoded"):
                for i, chunk in enumerate(decoded):
                    n = chunk.keys.shape[2]  # ``c``, or the partial last chunk's
                    ks[:, :, i * c : i * c + n].copy_(chunk.keys)
                    vs[:, i * c : i * c + n].copy_(chunk.values)
        n_ok, refused = 0, None
        with clock.time("decode"):
            for j, blob in enumerate(blobs):
                i = nd + j
                n = tail_tokens if i == tail_at else c
                try:
                    shape = expected if n == c else replace(expected, num_tokens=n)
                    why = shape.mismatch(codec.inspect(blob))
                    if why is None:
                        k = ks[:, :, i * c : i * c + n]
                        v = vs[:, i * c : i * c + n].transpose(1, 2)
                        codec.decode_into(blob, k, v, verified=True)
                except Exception as e:  # a chunk's bytes must never crash the worker
                    why = f"{type(e).__name__}: {e}"
                if why is not None:
                    refused = f"chunk {i}: {why}"
                    break
                n_ok += 1
        loaded_end = min(end, first_token + tokens(nd + n_ok))
        if loaded_end > start:
            with clock.time("copy"):
                a, b = start - first_token, loaded_end - first_token
                self._copy(ks, vs, a, b, block_ids, start, on_layer)
        return Loaded(max(start, loaded_end), refused, n_ok)

    def _copy_decoded(
        self,
        decoded: Sequence[DecodedChunk],
        c: int,
        first_token: int,
        start: int,
        end: int,
        block_ids: Sequence[int],
    ) -> None:
        """Tokens ``[start, end)`` of the pre-decoded chunks (``c`` tokens apart from
        ``first_token`` on; ``end`` within the last one's tokens) into their blocks straight
        from each chunk (its keys and values are laid out as the staging buffers are): no
        staging copy."""
        for i, chunk in enumerate(decoded):
            lo, hi = max(start, first_token + i * c), min(end, first_token + (i + 1) * c)
            if hi > lo:
                base = first_token + i * c
                self._copy(chunk.keys, chunk.values, lo - base, hi - base, block_ids, lo)

    def _copy(
        self,
        ks: torch.Tensor,
        vs: torch.Tensor,
        a: int,
        b: int,
        block_ids: Sequence[int],
        start: int,
        on_layer: Callable[[int], None] | None = None,
    ) -> None:
        """Staged tokens ``[a, b)`` (request tokens from ``start``) into their blocks, layer
        by layer (``on_layer(i)`` after layer ``i``)."""
        lay = self.layout
        kbs = lay.kernel_block_size
        if start % kbs or (b - a) % kbs:
            blk, off = slots(block_ids, start, start + b - a, lay)
            blk, off = blk.to(self.device), off.to(self.device)
            for i, views in enumerate(self.kv_views):
                kv = torch.stack([ks[i, :, a:b].transpose(0, 1), vs[i, a:b]])
                scatter(views, blk, off, kv)
                if on_layer is not None:
                    on_layer(i)
            return
        nkb = (b - a) // kbs
        first_kb = start // kbs  # the request's kernel block index of token ``start``
        per = lay.ratio
        table = torch.as_tensor(block_ids, dtype=torch.long)
        j = torch.arange(first_kb, first_kb + nkb)
        ids = (table[j // per] * per + j % per).to(self.device)
        for i, (k, v) in enumerate(self.kv_views):
            ksrc = ks[i, :, a:b].unflatten(1, (nkb, kbs))  # [H, nkb, kbs, D]
            k.index_copy_(0, ids, ksrc.transpose(0, 1))
            vsrc = vs[i, a:b].unflatten(0, (nkb, kbs))  # [nkb, kbs, H, D]
            v.index_copy_(0, ids, vsrc.transpose(1, 2))
            if on_layer is not None:
                on_layer(i)
