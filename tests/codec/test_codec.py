"""Codec round trips, error bounds, container checks and fuzzing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvaas import codec
from kvaas.codec import CodecError, CorruptBlobError, UnknownSchemeError, UnsupportedVersionError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(2, 2, 256, 2, 64), (1, 2, 1, 1, 64), (3, 2, 77, 4, 32), (2, 2, 300, 2, 48)]


def kv_like(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """KV-shaped data with per-channel scale differences and a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    chan = torch.linspace(0.2, 3.0, shape[-1])
    chan[::13] *= 8  # outlier channels, as real keys have
    x[:, 0] = x[:, 0] * chan + torch.randn(shape[-1], generator=g)  # keys: offsets per channel
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scheme", ["none", "lossless"])
def test_bit_exact_schemes(scheme: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    kv = kv_like(shape, dtype)
    out = codec.decode(codec.encode(kv, scheme))
    assert out.dtype == dtype and out.shape == kv.shape
    # compare bit patterns (NaN-safe, -0.0 kept)
    assert torch.equal(out.contiguous().view(torch.uint8), kv.contiguous().view(torch.uint8))


def test_lossless_keeps_special_values() -> None:
    kv = kv_like((1, 2, 16, 1, 8), torch.bfloat16)
    kv[0, 0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, float("-inf")])
    out = codec.decode(codec.encode(kv, "lossless"))
    assert torch.equal(out.view(torch.uint8), kv.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scheme,bits", [("int8", 8), ("int4", 4)])
def test_quantized_error_is_bounded_by_group_step(
    scheme: str, bits: int, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    kv = kv_like(shape, dtype, seed=1)
    out = codec.decode(codec.encode(kv, scheme))
    assert out.dtype == dtype and out.shape == kv.shape
    x, y = kv.float(), out.float()
    # values are quantized per token over groups of channels: the error of each element is at
    # most half a quantization step of its group (plus float16-scale and output rounding).
    gv = 64 if shape[-1] % 64 == 0 else shape[-1]
    v = x[:, 1].reshape(*x.shape[:1], x.shape[2], x.shape[3], -1, gv)
    rng = v.amax(-1) - v.amin(-1) if bits == 4 else 2 * v.abs().amax(-1)
    step = rng / ((1 << bits) - 2)
    err = (y[:, 1] - x[:, 1]).abs().reshape(v.shape)
    tol = step.unsqueeze(-1) * 0.5 * 1.02 + v.abs() * 2**-7 + 1e-4
    assert bool((err <= tol).all())
    # keys: relative error small overall
    rel = (y[:, 0] - x[:, 0]).norm() / x[:, 0].norm()
    assert rel < (0.01 if bits == 8 else 0.12)


def test_ratios_vs_bf16() -> None:
    kv = kv_like((4, 2, 256, 2, 64), torch.bfloat16)
    raw = kv.numel() * 2
    assert raw / len(codec.encode(kv, "int8")) >= 1.9
    assert raw / len(codec.encode(kv, "int4")) >= 3.5


def test_inspect_reads_header_without_decoding() -> None:
    kv = kv_like((3, 2, 100, 2, 32), torch.float16)
    blob = codec.encode(kv, "int4")
    h = codec.inspect(blob)
    assert h.shape == (3, 2, 100, 2, 32) and h.dtype == torch.float16
    assert h.scheme_id == codec.scheme_id("int4") and h.num_tokens == 100
    assert h.params["gk"] == 64 and h.total_size == len(blob)


def test_typed_errors() -> None:
    kv = kv_like((1, 2, 8, 1, 8), torch.float32)
    blob = bytearray(codec.encode(kv, "none"))
    with pytest.raises(UnknownSchemeError):
        codec.encode(kv, "zip")
    with pytest.raises(codec.InvalidInputError):
        codec.encode(torch.zeros(2, 3), "none")
    with pytest.raises(codec.InvalidInputError):
        codec.encode(torch.zeros(1, 2, 4, 1, 8, dtype=torch.int32), "none")
    bad = bytearray(blob)
    bad[-20] ^= 0x01
    with pytest.raises(CorruptBlobError, match="checksum"):
        codec.decode(bytes(bad))
    with pytest.raises(CorruptBlobError):
        codec.decode(bytes(blob[:-1]))
    v2 = bytearray(blob)
    v2[4] = 2
    with pytest.raises(UnsupportedVersionError):
        codec.verify_blob(bytes(v2))
    with pytest.raises(CorruptBlobError, match="magic"):
        codec.decode(b"XXXX" + bytes(blob[4:]))


@st.composite
def _mutated_blob(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """``(original, mutated)``: a valid blob and a mutation of it (which may leave it unchanged,
    e.g. a header byte overwritten with its own value)."""
    scheme = draw(st.sampled_from(sorted(codec.SCHEMES)))
    dtype = draw(st.sampled_from(DTYPES))
    t = draw(st.integers(1, 40))
    kv = kv_like((1, 2, t, 1, 16), dtype, seed=t)
    original = codec.encode(kv, scheme)
    blob = bytearray(original)
    kind = draw(st.sampled_from(["flip", "truncate", "extend", "header", "random"]))
    if kind == "flip":
        i = draw(st.integers(0, len(blob) - 1))
        blob[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        blob = blob[: draw(st.integers(0, len(blob) - 1))]
    elif kind == "extend":
        blob += draw(st.binary(min_size=1, max_size=16))
    elif kind == "header":
        i = draw(st.integers(0, 27))
        blob[i] = draw(st.integers(0, 255))
    else:
        blob = bytearray(draw(st.binary(max_size=256)))
    return original, bytes(blob)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated_blob())
def test_fuzzed_blobs_are_rejected_with_codec_errors(case: tuple[bytes, bytes]) -> None:
    """The checksum covers every byte before it and the header fixes the total length, so any
    change to a blob (flag bits included) is rejected; only the unchanged blob decodes."""
    original, blob = case
    if blob == original:
        assert codec.decode(blob).shape == codec.verify_blob(original).shape
        return
    with pytest.raises(CodecError):
        codec.decode(blob)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=64), st.sampled_from(sorted(codec.SCHEMES)))
def test_valid_checksum_garbage_payload_is_rejected(payload: bytes, scheme: str) -> None:
    """Even a blob with a correct checksum but nonsense payload fails with a CodecError."""
    from hypothesis import assume

    from kvaas.codec.container import pack

    assume(not (scheme == "none" and len(payload) == 1 * 2 * 3 * 1 * 4 * 2))
    blob = pack(codec.scheme_id(scheme), torch.Size([1, 2, 3, 1, 4]), torch.float16, {}, payload)
    with pytest.raises(CodecError):
        codec.decode(blob)
