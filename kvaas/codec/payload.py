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
    group length, the scales' dtype (``"f16"`` or ``"f32"``) and the whole payload, which the
    sections are consecutive views of, in that order."""

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
    payload: memoryview


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


def staged_on(payload: memoryview, device: torch.device) -> torch.Tensor:
    """The payload's bytes as one uint8 tensor on ``device``, moved there by one copy. On a
    CUDA device the bytes are staged in pinned host memory and copied without blocking the
    thread (PyTorch's caching host allocator keeps the pinned buffer until the copy that reads
    it has run, so it is never reused early); elsewhere the copy is plain."""
    pinned = device.type == "cuda"
    host = torch.empty(len(payload), dtype=torch.uint8, pin_memory=pinned)
    host.numpy()[:] = np.frombuffer(payload, dtype=np.uint8)
    return host.to(device, non_blocking=pinned)


def staged_sections(sec: Sections, staged: torch.Tensor) -> list[torch.Tensor | None]:
    """``sec``'s sections as slices of ``staged`` (the whole payload, wherever it lives), in
    the payload's order: key codes, key scales, key minima, value codes, value scales, value
    minima (``None`` where ``sec`` has none)."""
    out: list[torch.Tensor | None] = []
    off = 0
    for part in (sec.kcodes, sec.kscale, sec.kmin, sec.vcodes, sec.vscale, sec.vmin):
        if part is None:
            out.append(None)
            continue
        out.append(staged[off : off + len(part)])
        off += len(part)
    if off != staged.numel():
        raise ValueError("the staged bytes are not the payload of these sections")
    return out


def unpack_nibbles_on(packed: torch.Tensor, count: int) -> torch.Tensor:
    """:func:`unpack_nibbles` of a uint8 tensor, on the tensor's own device: ``count`` codes,
    low nibble first."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(-1)[:count]


def bytes_as(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A uint8 tensor's bytes read as ``dtype`` (the payload's little-endian values): a view
    when the bytes are aligned for ``dtype``, else an aligned copy."""
    item = torch.empty((), dtype=dtype).element_size()
    if raw.storage_offset() % item:
        raw = raw.clone()
    return raw.view(dtype)
