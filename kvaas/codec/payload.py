"""A quantized payload's pieces: its sections as views of the stored bytes, and the packing of
4-bit codes two to a byte (low nibble first). Shared by the schemes' general paths
(:mod:`kvaas.codec.schemes`) and the CPU fast paths (:mod:`kvaas.codec.cpu_paths`)."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class Sections:
    """A quantized payload's sections (views of it, sizes checked): key codes, key scales,
    key minima, value codes, value scales, value minima (minima only when asymmetric); the
    key group length ``g`` (at most the chunk's tokens), the number of key groups, the value
    group length and the scales' dtype (``"f16"`` or ``"f32"``)."""

    kcodes: memoryview
    kscale: memoryview
    kmin: memoryview | None
    vcodes: memoryview
    vscale: memoryview
    vmin: memoryview | None
    g: int
    ngk: int
    gv: int
    sd: str


def pack_nibbles(codes: torch.Tensor) -> bytes:
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).numpy().tobytes()


def readonly_u8(buf: memoryview) -> torch.Tensor:
    """The bytes of ``buf`` as a uint8 tensor without copying (never written)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only buffer: only read here
        return torch.from_numpy(np.frombuffer(buf, dtype=np.uint8))


def unpack_nibbles(buf: memoryview, count: int) -> torch.Tensor:
    """Codes ``count``, two per byte, low nibble first. Each byte is widened to 16 bits and
    its high nibble moved up one byte, so that the 16-bit words read as bytes are the codes
    in order (little-endian): a few contiguous operations, no strided writes."""
    w = readonly_u8(buf).to(torch.int16)
    lo = w & 0x0F
    w.bitwise_and_(0xF0).bitwise_left_shift_(4).bitwise_or_(lo)
    if sys.byteorder == "little":
        return w.view(torch.uint8)[:count]
    out = torch.empty(w.numel() * 2, dtype=torch.uint8)  # pragma: no cover (big-endian)
    out[0::2], out[1::2] = lo, w >> 8
    return out[:count]
