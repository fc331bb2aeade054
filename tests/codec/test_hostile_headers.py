"""Blobs whose header claims more data than their payload holds are refused before the decoder
allocates anything sized from the header (a checksum only proves the writer was consistent)."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
import torch
import zstandard

from kvaas import codec
from kvaas.codec import CorruptBlobError
from kvaas.codec.container import pack

# 67 M elements of float16: 134 MB of planes if the decoder trusted the header
HUGE = (8, 2, 4096, 8, 128)
LIMIT = 1 << 20  # bytes a refused blob may make the decoder allocate


def _peak_while_decoding(blob: bytes) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(CorruptBlobError):
            codec.decode(blob)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _lossless(shape: tuple[int, ...], planes: list[bytes], sizes: list[int]) -> bytes:
    return pack(
        1, torch.Size(shape), torch.float16, {"level": 3, "planes": sizes}, b"".join(planes)
    )


def test_lossless_garbage_planes_under_a_huge_header() -> None:
    blob = _lossless(HUGE, [b"\x01" * 5, b"\x02" * 5], [5, 5])
    assert _peak_while_decoding(blob) < LIMIT


def test_lossless_small_frames_under_a_huge_header() -> None:
    frame = zstandard.ZstdCompressor().compress(bytes(1000))
    blob = _lossless(HUGE, [frame, frame], [len(frame), len(frame)])
    assert _peak_while_decoding(blob) < LIMIT


def _frame(declared: int, data: bytes) -> bytes:
    """A zstd frame whose header declares ``declared`` content bytes, holding one raw block."""
    head = struct.pack("<I", 0xFD2FB528) + bytes([0xE0]) + struct.pack("<Q", declared)
    return head + struct.pack("<I", (len(data) << 3) | 1)[:3] + data


def test_lossless_frame_declaring_more_than_the_header() -> None:
    """A modest header, but a frame whose own header declares 512 MB: zstd would allocate the
    declared size before finding the data short."""
    shape = (1, 2, 16, 1, 64)  # 2048 elements
    frame = _frame(1 << 29, bytes(16))
    assert zstandard.frame_content_size(frame) == 1 << 29
    blob = _lossless(shape, [frame, frame], [len(frame), len(frame)])
    assert _peak_while_decoding(blob) < LIMIT


def test_lossless_raw_plane_of_the_wrong_size() -> None:
    blob = _lossless(HUGE, [b"\x00" * 64, b"\x00" * 64], [-64, -64])
    assert _peak_while_decoding(blob) < LIMIT


@pytest.mark.parametrize("scheme_id", [2, 3])
def test_quantized_key_group_longer_than_the_chunk_is_not_padded(scheme_id: int) -> None:
    """A key group size from the parameters, far beyond the chunk's tokens, is one group of
    those tokens: the decoder never pads the codes out to it (2^40 bytes here)."""
    L, T, H, D = 1, 1, 1, 64
    sym = scheme_id == 2
    codes = L * H * D * T if sym else (L * H * D * T + 1) // 2
    kscales = L * H * D * 2 * (1 if sym else 2)  # float16 scales (and minimums)
    vscales = L * T * H * 2 * (1 if sym else 2)
    payload = bytes(codes + kscales + codes + vscales)
    params = {"gk": 1 << 40, "gv": 64, "sd": "f16"}
    blob = pack(scheme_id, torch.Size((L, 2, T, H, D)), torch.float32, params, payload)
    out = codec.decode(blob)
    assert out.shape == (L, 2, T, H, D)


@pytest.mark.parametrize("scheme", ["none", "lossless", "int8", "int4"])
def test_valid_blobs_still_decode(scheme: str) -> None:
    for kv in (torch.zeros(2, 2, 256, 2, 64), torch.randn(3, 2, 77, 4, 32).half()):
        out = codec.decode(codec.encode(kv, scheme))
        assert out.shape == kv.shape and out.dtype == kv.dtype
