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
    "decode_into",
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


def decode_into(
    blob: bytes | bytearray | memoryview,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    verified: bool = False,
) -> BlobHeader:
    """Decode a blob straight into ``keys`` and ``values``: each a ``[num_layers,
    num_kv_heads, num_tokens, head_dim]`` tensor (any strides, e.g. a slice of a staging
    buffer; any device) of the blob's dtype. Writes exactly the values :func:`decode` returns
    (bit-exact), without allocating the canonical chunk. Returns the header.

    ``verified=True`` skips the checksum (the caller got the blob from a store that verified
    it); the header's structure is checked either way. Raises only
    :class:`~kvaas.codec.errors.CodecError` subclasses
    (:class:`~kvaas.codec.errors.InvalidInputError` when the destination does not match the
    header; nothing is written then)."""
    header = read_header(blob) if verified else verify_blob(blob)
    s = SCHEMES_BY_ID.get(header.scheme_id)
    if s is None:
        raise UnknownSchemeError(f"unknown scheme id {header.scheme_id}")
    L, _, T, H, D = header.shape
    for name, t in (("keys", keys), ("values", values)):
        if tuple(t.shape) != (L, H, T, D) or t.dtype != header.dtype:
            raise InvalidInputError(
                f"{name} destination is {list(t.shape)} {t.dtype}, the blob holds "
                f"{[L, H, T, D]} {header.dtype}"
            )
    try:
        s.decode_into(header, payload_view(blob, header), keys, values)
    except CodecError:
        raise
    except (ValueError, RuntimeError, TypeError, IndexError, OverflowError, MemoryError) as e:
        raise CorruptBlobError(f"undecodable payload: {e}") from e
    return header


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
