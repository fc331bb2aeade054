"""Decoding straight into caller-provided tensors (``codec.decode_into``), and the faster
quantized decode behind it, against the format's reference decoding.

``_reference_decode`` below is the quantized decoder as the blob format was first released
(nibble unpacking by strided writes, ``addcmul`` with both the minimum and the scale broadcast,
then a transposing copy): blobs already stored were written for it, so every decode path must
return exactly its bits, on every scheme, dtype and the odd shapes (a last key group shorter
than the group size, a group longer than the chunk, a head size the value group does not
divide).
"""

from __future__ import annotations

import pytest
import torch
from kvtest.codec_reference import Staging, reference_decode

from kvaas import codec
from kvaas.codec import InvalidInputError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(2, 2, 256, 2, 64), (1, 2, 1, 1, 64), (3, 2, 77, 4, 32), (2, 2, 300, 2, 48)]
SCHEMES = ["none", "lossless", "int8", "int4"]


def _kv(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[:, 0] = x[:, 0] * torch.linspace(0.2, 3.0, shape[-1]) + torch.randn(shape[-1], generator=g)
    return x.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_decode_and_decode_into_match_the_reference_bit_for_bit(
    scheme: str, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    blob = codec.encode(_kv(shape, dtype), scheme)
    ref = reference_decode(blob)
    assert torch.equal(_bits(codec.decode(blob)), _bits(ref))
    staging = Staging(shape, dtype)
    header = codec.decode_into(blob, staging.keys, staging.values, verified=True)
    assert header.shape == tuple(shape)
    assert torch.equal(_bits(staging.keys), _bits(ref[:, 0].transpose(1, 2)))
    assert torch.equal(_bits(staging.values), _bits(ref[:, 1].transpose(1, 2)))
    assert staging.untouched_outside()


def test_decode_into_refuses_a_destination_of_another_shape_or_dtype() -> None:
    blob = codec.encode(_kv((2, 2, 64, 2, 32), torch.float32), "int4")
    good = torch.empty(2, 2, 64, 32)
    with pytest.raises(InvalidInputError, match="keys destination"):
        codec.decode_into(blob, torch.empty(2, 2, 32, 32), good)
    with pytest.raises(InvalidInputError, match="values destination"):
        codec.decode_into(blob, good, good.to(torch.bfloat16))


def test_decode_into_verifies_the_checksum_unless_told_the_blob_was_verified() -> None:
    blob = bytearray(codec.encode(_kv((1, 2, 16, 1, 8), torch.float32), "int8"))
    blob[-1] ^= 0xFF  # the checksum only: the payload still decodes
    k, v = torch.empty(1, 1, 16, 8), torch.empty(1, 1, 16, 8)
    with pytest.raises(codec.CorruptBlobError, match="checksum"):
        codec.decode_into(bytes(blob), k, v)
    codec.decode_into(bytes(blob), k, v, verified=True)  # the store checked it already
