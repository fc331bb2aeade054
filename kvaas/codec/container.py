"""The blob container: a fixed header, scheme parameters, the payload and a checksum.

Layout (little-endian)::

    offset size  field
    0      4     magic  b"KVC\\x00"
    4      1     format version (1)
    5      1     scheme id
    6      1     dtype id (1 float32, 2 float16, 3 bfloat16)
    7      1     flags (reserved, 0)
    8      2     num_layers
    10     2     num_kv_heads
    12     2     head_dim
    14     2     params length P
    16     4     num_tokens
    20     8     payload length N
    28     P     scheme parameters (JSON, UTF-8)
    28+P   N     payload
    28+P+N 8     xxh3_64 of every byte before it

A chunk of KV has the canonical shape ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]``
(index 0 keys, 1 values). :func:`verify_blob` checks structure and checksum without decoding;
:func:`read_header` refuses a header whose dimensions no payload of its length can hold, and each
scheme checks its payload against the header before allocating anything of the header's size.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from kvaas.codec.errors import CorruptBlobError, InvalidInputError, UnsupportedVersionError

MAGIC = b"KVC\x00"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sBBBBHHHHIQ")
HEADER_SIZE = _HEADER.size  # 28
CHECKSUM_SIZE = 8
MAX_PARAMS_BYTES = 4096
#: Most KV elements one payload byte can stand for, in any scheme: lossless planes are zstd
#: frames, which expand at most 32768 times (a 4-byte run-length block per 128 KiB); the other
#: schemes store at least half a byte per element. A header claiming more is corrupt.
MAX_ELEMENTS_PER_BYTE = (128 * 1024) // 4

DTYPE_IDS: dict[torch.dtype, int] = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
DTYPES_BY_ID: dict[int, torch.dtype] = {v: k for k, v in DTYPE_IDS.items()}


@dataclass(frozen=True, slots=True)
class BlobHeader:
    """Everything about a blob except its payload bytes."""

    version: int
    scheme_id: int
    dtype: torch.dtype
    num_layers: int
    num_tokens: int
    num_kv_heads: int
    head_dim: int
    params: dict[str, Any] = field(default_factory=dict)
    payload_offset: int = 0
    payload_size: int = 0

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_tokens, self.num_kv_heads, self.head_dim)

    @property
    def num_elements(self) -> int:
        return self.num_layers * 2 * self.num_tokens * self.num_kv_heads * self.head_dim

    @property
    def bf16_bytes(self) -> int:
        """Size of the same KV stored as bfloat16 (the reference for ratios)."""
        return self.num_elements * 2

    @property
    def total_size(self) -> int:
        return self.payload_offset + self.payload_size + CHECKSUM_SIZE


def check_kv(kv: torch.Tensor) -> None:
    """Raise :class:`InvalidInputError` unless ``kv`` has the canonical layout and a float dtype."""
    if not isinstance(kv, torch.Tensor):
        raise InvalidInputError(f"expected a torch.Tensor, got {type(kv).__name__}")
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise InvalidInputError(
            f"expected shape [layers, 2, tokens, kv_heads, head_dim], got {list(kv.shape)}"
        )
    if kv.dtype not in DTYPE_IDS:
        raise InvalidInputError(f"unsupported dtype {kv.dtype}; use float32, float16 or bfloat16")
    layers, _, tokens, heads, dim = kv.shape
    if not (0 < layers < 2**16 and 0 < heads < 2**16 and 0 < dim < 2**16 and 0 < tokens < 2**32):
        raise InvalidInputError(f"dimensions out of range: {list(kv.shape)}")
    if kv.device.type != "cpu":
        raise InvalidInputError("encode takes CPU tensors; move the chunk to the CPU first")


def pack(
    scheme_id: int, kv_shape: torch.Size, dtype: torch.dtype, params: dict[str, Any], payload: bytes
) -> bytes:
    """Assemble a blob from a scheme's payload."""
    layers, _, tokens, heads, dim = kv_shape
    pbytes = json.dumps(params, separators=(",", ":"), sort_keys=True).encode() if params else b""
    if len(pbytes) > MAX_PARAMS_BYTES:
        raise InvalidInputError("scheme parameters too large")
    head = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        scheme_id,
        DTYPE_IDS[dtype],
        0,
        layers,
        heads,
        dim,
        len(pbytes),
        tokens,
        len(payload),
    )
    h = xxhash.xxh3_64()
    h.update(head)
    h.update(pbytes)
    h.update(payload)
    return b"".join((head, pbytes, payload, h.digest()))


def read_header(blob: bytes | bytearray | memoryview) -> BlobHeader:
    """Parse and sanity-check the header (lengths included), without the checksum."""
    mv = memoryview(blob)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    if len(mv) < HEADER_SIZE + CHECKSUM_SIZE:
        raise CorruptBlobError(f"blob too short ({len(mv)} bytes)")
    magic, version, scheme_id, dtype_id, _flags, layers, heads, dim, plen, tokens, nbytes = (
        _HEADER.unpack_from(mv, 0)
    )
    if magic != MAGIC:
        raise CorruptBlobError("not a KV blob (bad magic)")
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"blob format version {version}; this reader supports {FORMAT_VERSION}"
        )
    if dtype_id not in DTYPES_BY_ID:
        raise CorruptBlobError(f"unknown dtype id {dtype_id}")
    if plen > MAX_PARAMS_BYTES:
        raise CorruptBlobError("parameter block too large")
    expected = HEADER_SIZE + plen + nbytes + CHECKSUM_SIZE
    if expected != len(mv):
        raise CorruptBlobError(f"blob length {len(mv)} does not match its header ({expected})")
    if min(layers, heads, dim, tokens) == 0:
        raise CorruptBlobError("zero-sized dimension in header")
    if layers * 2 * tokens * heads * dim > nbytes * MAX_ELEMENTS_PER_BYTE:
        raise CorruptBlobError("payload too small for the header's dimensions")
    params: dict[str, Any] = {}
    if plen:
        try:
            params = json.loads(bytes(mv[HEADER_SIZE : HEADER_SIZE + plen]))
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptBlobError("unreadable scheme parameters") from e
        if not isinstance(params, dict):
            raise CorruptBlobError("scheme parameters are not an object")
    return BlobHeader(
        version=version,
        scheme_id=scheme_id,
        dtype=DTYPES_BY_ID[dtype_id],
        num_layers=layers,
        num_tokens=tokens,
        num_kv_heads=heads,
        head_dim=dim,
        params=params,
        payload_offset=HEADER_SIZE + plen,
        payload_size=nbytes,
    )


def verify_blob(blob: bytes | bytearray | memoryview) -> BlobHeader:
    """Check magic, version, lengths and checksum; return the header. Cheap: no decoding."""
    header = read_header(blob)
    mv = memoryview(blob).cast("B") if isinstance(blob, memoryview) else memoryview(blob)
    end = len(mv) - CHECKSUM_SIZE
    if xxhash.xxh3_64_digest(mv[:end]) != bytes(mv[end:]):
        raise CorruptBlobError("checksum mismatch")
    return header


def payload_view(blob: bytes | bytearray | memoryview, header: BlobHeader) -> memoryview:
    mv = memoryview(blob).cast("B") if isinstance(blob, memoryview) else memoryview(blob)
    return mv[header.payload_offset : header.payload_offset + header.payload_size]
