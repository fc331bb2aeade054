"""The KV codec: one chunk of KV cache (all layers, keys and values) ⇄ one checksummed blob.

Canonical chunk layout: ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]`` (0 keys,
1 values), dtype float32, float16 or bfloat16, on the CPU. ``decode`` returns the same shape and
dtype. Decoding any byte string raises only :class:`~kvaas.codec.errors.CodecError` subclasses.
"""

from __future__ import annotations

from typing import Any

import torch

from kvaas.codec.container import BlobHeader, check_kv, pack, payload_view, read_header, verify_blob
from kvaas.codec.errors import (
    CodecError,
    CorruptBlobError,
    InvalidInputError,
    UnknownSchemeError,
    UnsupportedVersionError,
)
from kvaas.codec.schemes import SCHEMES, SCHEMES_BY_ID, Scheme

__all__ = [
    "SCHEMES",
    "BlobHeader",
    "CodecError",
    "CorruptBlobError",
    "InvalidInputError",
    "UnknownSchemeError",
    "UnsupportedVersionError",
    "decode",
    "encode",
    "inspect",
    "scheme_id",
    "verify_blob",
]


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise UnknownSchemeError(
            f"unknown compression scheme {name!r}; choose one of {sorted(SCHEMES)}"
        ) from None


def scheme_id(name: str) -> int:
    """The stable numeric id of a scheme (part of chunk identity)."""
    return get_scheme(name).id


def encode(kv: torch.Tensor, scheme: str = "int4", **params: Any) -> bytes:
    """Encode a canonical KV chunk with ``scheme`` into a blob."""
    s = get_scheme(scheme)
    check_kv(kv)
    used, payload = s.encode(kv.detach(), **params)
    return pack(s.id, kv.shape, kv.dtype, used, payload)


def inspect(blob: bytes | bytearray | memoryview) -> BlobHeader:
    """The blob's header (structure checked, checksum not), without decoding the payload."""
    return read_header(blob)


def decode(blob: bytes | bytearray | memoryview) -> torch.Tensor:
    """Verify and decode a blob into a KV chunk tensor."""
    header = verify_blob(blob)
    s = SCHEMES_BY_ID.get(header.scheme_id)
    if s is None:
        raise UnknownSchemeError(f"unknown scheme id {header.scheme_id}")
    try:
        return s.decode(header, payload_view(blob, header))
    except CodecError:
        raise
    except (ValueError, RuntimeError, TypeError, IndexError, OverflowError, MemoryError) as e:
        # A checksummed blob that still fails to decode was written inconsistently.
        raise CorruptBlobError(f"undecodable payload: {e}") from e
