"""The quantized schemes' CPU fast paths write and read exactly the stored format.

``_reference_encode`` and ``_reference_decode`` below are the int8/int4 encoder and decoder
as the format was released (copied here, unchanged in what they compute): blobs already
stored were written by the first and read by the second. Every encode must produce their
bytes, and every decode (``decode`` and ``decode_into``, into any destination layout) their
values bit for bit, for float32, float16 and bfloat16 chunks, the odd shapes the format
allows (a short last key group, a key group longer than the chunk, odd lengths whose int4
codes straddle rows, a head size the value group does not divide), values whose scales are
subnormal, zero or need float32, and payloads no encoder writes (zero, negative, subnormal
and non-finite scales).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from kvtest.codec_reference import Staging, reference_decode

from kvaas import codec
from kvaas.codec import cpu_paths
from kvaas.codec.container import pack, payload_view, read_header

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [
    (2, 2, 256, 2, 64),  # whole key groups
    (3, 2, 77, 4, 32),  # a short last key group, odd length
    (2, 2, 300, 2, 48),  # a head size the value group does not divide
    (1, 2, 1, 1, 64),  # one token
    (2, 2, 16, 3, 8),  # a key group longer than the chunk
    (1, 2, 5, 1, 3),  # every dimension odd: int4 codes straddle rows and pad
    (3, 2, 130, 1, 64),  # even length, short last group
]
KINDS = ["normal", "tiny", "zeros", "wide", "huge"]
QUANT = {"int8": (8, True), "int4": (4, False)}


# --- the released reference ----------------------------------------------------------------


def _reference_quantize(
    x: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    qmax = (1 << bits) - 1
    mx, mn = x.amax(dim), x.amin(dim)
    if sym:
        half = (1 << (bits - 1)) - 1
        scale = (torch.maximum(mx, mn.neg()) / half).to(scale_dtype)
        s = scale.float()
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        q = (x * inv.unsqueeze(dim)).round_().clamp_(-half, half).add_(half + 1)
        return q.to(torch.uint8), scale, None
    scale = ((mx - mn) / qmax).to(scale_dtype)
    mn_q = mn.to(scale_dtype)
    s, m = scale.float(), mn_q.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    q = ((x - m.unsqueeze(dim)) * inv.unsqueeze(dim)).round_().clamp_(0, qmax)
    return q.to(torch.uint8), scale, mn_q


def _reference_codes(codes: torch.Tensor, bits: int) -> bytes:
    flat = codes.contiguous().reshape(-1)
    if bits == 8:
        return flat.numpy().tobytes()
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).numpy().tobytes()


def _reference_encode(kv: torch.Tensor, scheme: str, gk: int, gv: int) -> tuple[dict, bytes]:
    """The released int8/int4 encoder: ``(params, payload)``."""
    bits, sym = QUANT[scheme]
    L, _, T, H, D = kv.shape
    gv = gv if D % gv == 0 else D
    lo, hi = torch.aminmax(kv)
    big = max(-float(lo), float(hi))
    x = kv.float()
    sdt = torch.float16 if big < 30000.0 else torch.float32
    k = x[:, 0]
    if T % gk:
        k = torch.cat([k, k[:, -1:].expand(L, gk - T % gk, H, D)], dim=1)
    kq, ks, km = _reference_quantize(k.reshape(L, -1, gk, H, D), bits, sym, sdt, dim=2)
    kcodes = kq.reshape(L, -1, H, D)[:, :T].permute(0, 2, 3, 1)
    vq, vs, vm = _reference_quantize(x[:, 1].reshape(L, T, H, D // gv, gv), bits, sym, sdt, -1)
    parts = [_reference_codes(kcodes, bits), ks.permute(0, 2, 3, 1).contiguous().numpy().tobytes()]
    if km is not None:
        parts.append(km.permute(0, 2, 3, 1).contiguous().numpy().tobytes())
    parts += [_reference_codes(vq, bits), vs.numpy().tobytes()]
    if vm is not None:
        parts.append(vm.numpy().tobytes())
    sd = "f16" if sdt == torch.float16 else "f32"
    return {"gk": gk, "gv": gv, "sd": sd}, b"".join(parts)


def _kv(shape: tuple[int, ...], dtype: torch.dtype, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[:, 0] = x[:, 0] * torch.linspace(0.2, 3.0, shape[-1]) + torch.randn(shape[-1], generator=g)
    if kind == "tiny":  # scales below float16's normal range (subnormal, some zero)
        x = x * torch.logspace(-9, -3, shape[2]).view(1, 1, -1, 1, 1)
    elif kind == "zeros":  # whole groups of zeros, both signs
        x[:, :, : max(1, shape[2] // 2)] = 0.0
        x[:, 1, :, :, : max(1, shape[-1] // 2)] = -0.0
    elif kind == "wide":  # a large offset over a small spread: int4 codes clamp
        x = 500.0 + 0.01 * x
    elif kind == "huge":  # a magnitude past 30000: float32 scales
        x[0, 0, 0, 0, 0] = 40000.0
    return x.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.fixture(params=["slices", "layers"])
def slicing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoder's default slices of layers, and one layer per slice."""
    if request.param == "layers":
        monkeypatch.setattr(cpu_paths, "_SLICE_ELEMENTS", 1)


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_encode_writes_the_reference_bytes(
    scheme: str, shape: tuple[int, ...], dtype: torch.dtype, kind: str
) -> None:
    kv = _kv(shape, dtype, kind)
    s = codec.SCHEMES[scheme]
    for gk, gv in ((s.gk, s.gv), (32, 16), (5, 3)):  # type: ignore[attr-defined]
        params, payload = s.encode(kv, gk=gk, gv=gv)
        ref_params, ref_payload = _reference_encode(kv, scheme, gk, gv)
        assert params == ref_params
        assert bytes(payload) == ref_payload


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_decode_reads_the_reference_values(
    scheme: str, shape: tuple[int, ...], dtype: torch.dtype, kind: str, slicing: None
) -> None:
    kv = _kv(shape, dtype, kind, seed=1)
    params, payload = _reference_encode(kv, scheme, 64, 16)
    blob = pack(codec.scheme_id(scheme), kv.shape, dtype, params, payload)
    ref = reference_decode(blob)
    assert torch.equal(_bits(codec.decode(blob)), _bits(ref))
    staging = Staging(shape, dtype)  # the connector's staging slices
    codec.decode_into(blob, staging.keys, staging.values, verified=True)
    assert torch.equal(_bits(staging.keys), _bits(ref[:, 0].transpose(1, 2)))
    assert torch.equal(_bits(staging.values), _bits(ref[:, 1].transpose(1, 2)))
    assert staging.untouched_outside()


def _crafted(scheme: str, shape: tuple[int, ...], dtype: torch.dtype, special: float) -> bytes:
    """A payload of random codes and float16 scales (and minima), a few of them ``special``."""
    bits, sym = QUANT[scheme]
    L, _, T, H, D = shape
    gk, gv = 4, D
    g = torch.Generator().manual_seed(3)
    n, nk, nv = L * T * H * D, L * H * D * (-(-T // gk)), L * T * H
    cbytes = (n + 1) // 2 if bits == 4 else n

    def sc(count: int) -> bytes:
        x = torch.rand(count, generator=g) * 0.1 - (0.0 if sym else 0.05)
        x[:: max(1, count // 3)] = special
        return x.half().numpy().tobytes()

    def cb() -> bytes:
        return torch.randint(0, 256, (cbytes,), generator=g, dtype=torch.uint8).numpy().tobytes()

    parts = [cb(), sc(nk)] + ([] if sym else [sc(nk)]) + [cb(), sc(nv)] + ([] if sym else [sc(nv)])
    params: dict[str, Any] = {"gk": gk, "gv": gv, "sd": "f16"}
    return pack(codec.scheme_id(scheme), torch.Size(shape), dtype, params, b"".join(parts))


@pytest.mark.parametrize("special", [0.0, -0.0, -0.02, 1e-7, 3e-5, float("inf"), float("nan")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_payloads_no_encoder_writes_decode_as_the_reference(
    scheme: str, dtype: torch.dtype, special: float
) -> None:
    """Zero, negative, subnormal and non-finite scales: the same values (NaN where the
    reference has NaN, whatever its bits)."""
    blob = _crafted(scheme, (2, 2, 10, 2, 8), dtype, special)
    ref, out = reference_decode(blob), codec.decode(blob)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(_bits(out[~nan]), _bits(ref[~nan]))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_the_fast_paths_serve_ordinary_chunks(scheme: str) -> None:
    """An ordinary chunk takes both CPU fast paths (the tests above compare them, not the
    general paths, with the reference); float32 scales take the general encoder."""
    bits = QUANT[scheme][0]
    kv = _kv((2, 2, 64, 2, 64), torch.bfloat16, "normal")
    assert cpu_paths.CpuQuantizer(kv, bits, 64, 64).payload() is not None
    assert cpu_paths.CpuQuantizer(_kv(kv.shape, kv.dtype, "huge"), bits, 64, 64).payload() is None
    blob = codec.encode(kv, scheme)
    h = read_header(blob)
    s = codec.SCHEMES[scheme]
    sec = s._sections(h, payload_view(blob, h))  # type: ignore[attr-defined]
    out = torch.empty(h.shape, dtype=h.dtype)
    assert cpu_paths.CpuDequantizer(sec, h.shape, bits).run(
        out[:, 0].transpose(1, 2), out[:, 1].transpose(1, 2)
    )
    assert torch.equal(_bits(out), _bits(reference_decode(blob)))


@pytest.mark.parametrize("sd", ["f16", "f32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_the_staged_path_decodes_as_the_reference(
    scheme: str, shape: tuple[int, ...], dtype: torch.dtype, sd: str
) -> None:
    """The path a GPU takes (the whole compressed payload copied to the device at once, 4-bit
    codes unpacked there, scales read from the copied bytes, aligned or not), run on CPU
    tensors: the reference's values bit for bit."""
    kv = _kv(shape, dtype, "normal" if sd == "f16" else "huge", seed=2)
    params, payload = _reference_encode(kv, scheme, 64, 16)
    assert params["sd"] == sd
    blob = pack(codec.scheme_id(scheme), kv.shape, dtype, params, payload)
    h = read_header(blob)
    s = codec.SCHEMES[scheme]
    sec = s._sections(h, payload_view(blob, h))  # type: ignore[attr-defined]
    staging = Staging(shape, dtype)
    s._decode_into_general(  # type: ignore[attr-defined]
        h, sec, staging.keys, staging.values, staged=True
    )
    ref = reference_decode(blob)
    assert torch.equal(_bits(staging.keys), _bits(ref[:, 0].transpose(1, 2)))
    assert torch.equal(_bits(staging.values), _bits(ref[:, 1].transpose(1, 2)))
    assert staging.untouched_outside()


def test_staged_bytes_are_read_aligned_or_copied() -> None:
    from kvaas.codec.payload import bytes_as, unpack_nibbles, unpack_nibbles_on

    raw = torch.tensor([0xFF, 0x00, 0x3C, 0x00, 0x40], dtype=torch.uint8)  # [1:5]: 1.0, 2.0 (f16)
    assert bytes_as(raw[1:5], torch.float16).tolist() == [1.0, 2.0]  # odd offset: a copy
    assert bytes_as(raw[0:4], torch.float16).data_ptr() == raw.data_ptr()  # aligned: a view
    packed = torch.randint(0, 256, (33,), dtype=torch.uint8)
    host = unpack_nibbles(memoryview(packed.numpy().tobytes()), 65)
    assert torch.equal(unpack_nibbles_on(packed, 65), host)
