"""Compression schemes. Each turns a canonical KV chunk into ``(params, payload)`` and back.

- ``none``: the raw bytes (bit-exact).
- ``lossless``: byte planes of a token-minor layout, each plane zstd-compressed (bit-exact).
- ``int8``: symmetric 8-bit; keys per channel (groups along tokens), values per token.
- ``int4``: asymmetric 4-bit (min + scale per group, fp16); keys per channel in groups of
  ``gk`` tokens, values per token in groups of ``gv`` channels; two codes per byte.

All work is vectorised with torch; nothing loops over tokens or channels.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import zstandard

from kvaas.codec.container import MAX_ELEMENTS_PER_BYTE, BlobHeader
from kvaas.codec.cpu_paths import CpuDequantizer, CpuQuantizer
from kvaas.codec.errors import CorruptBlobError
from kvaas.codec.payload import (
    Sections,
    bytes_as,
    pack_nibbles,
    readonly_u8,
    staged_on,
    staged_sections,
    unpack_nibbles,
    unpack_nibbles_on,
)

_NP_INT = {1: np.uint8, 2: np.int16, 4: np.int32}
_TORCH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
_local = threading.local()


def _as_bytes_view(kv: torch.Tensor) -> np.ndarray:
    """The tensor's raw bytes as a 2-D uint8 array ``[num_elements, itemsize]`` (no copy)."""
    item = kv.element_size()
    return kv.contiguous().view(_TORCH_INT[item]).numpy().view(np.uint8).reshape(-1, item)


def _from_bytes(
    buf: bytes | bytearray | memoryview | np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    item = torch.empty((), dtype=dtype).element_size()
    arr = np.frombuffer(buf, dtype=_NP_INT[item]) if not isinstance(buf, np.ndarray) else buf
    if arr.size != int(np.prod(shape)):
        raise CorruptBlobError("payload size does not match the header's shape")
    return torch.from_numpy(np.array(arr, copy=True)).view(dtype).reshape(shape)


class Scheme:
    """Base class of a scheme. ``id`` is stored in every blob and must never change."""

    name: ClassVar[str]
    id: ClassVar[int]
    lossless: ClassVar[bool]

    def encode(self, kv: torch.Tensor, **params: Any) -> tuple[dict[str, Any], bytes]:
        raise NotImplementedError

    def decode(self, header: BlobHeader, payload: memoryview) -> torch.Tensor:
        raise NotImplementedError

    def decode_into(
        self, header: BlobHeader, payload: memoryview, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Decode into ``keys`` and ``values``, each ``[layers, kv_heads, tokens, head_dim]``
        of the header's dtype, any strides, any device (checked by the caller), with exactly
        the values :meth:`decode` returns. This default decodes then copies."""
        kv = self.decode(header, payload).to(keys.device, non_blocking=True)
        keys.copy_(kv[:, 0].transpose(1, 2))
        values.copy_(kv[:, 1].transpose(1, 2))


class RawScheme(Scheme):
    name, id, lossless = "none", 0, True

    def encode(self, kv: torch.Tensor, **params: Any) -> tuple[dict[str, Any], bytes]:
        return {}, _as_bytes_view(kv).tobytes()

    def decode(self, header: BlobHeader, payload: memoryview) -> torch.Tensor:
        if len(payload) != header.num_elements * torch.empty((), dtype=header.dtype).element_size():
            raise CorruptBlobError("raw payload size does not match the header")
        return _from_bytes(payload, header.dtype, header.shape)

    def decode_into(
        self, header: BlobHeader, payload: memoryview, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        item = torch.empty((), dtype=header.dtype).element_size()
        if len(payload) != header.num_elements * item:
            raise CorruptBlobError("raw payload size does not match the header")
        # a read-only view of the payload: copied once, straight into the destination
        arr = np.frombuffer(payload, dtype=_NP_INT[item])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # not writable: only read here
            kv = torch.from_numpy(arr).view(header.dtype).reshape(header.shape)
        kv = kv.to(keys.device, non_blocking=True)
        keys.copy_(kv[:, 0].transpose(1, 2))
        values.copy_(kv[:, 1].transpose(1, 2))


def _zstd_c(level: int) -> zstandard.ZstdCompressor:
    key = f"c{level}"
    c = getattr(_local, key, None)
    if c is None:
        c = zstandard.ZstdCompressor(level=level)
        setattr(_local, key, c)
    return c


def _zstd_d() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


#: Most bytes one byte of a zstd frame can expand to: a frame is made of blocks of at most
#: 128 KiB, and the smallest block (run-length, one byte repeated) takes 4 bytes.
ZSTD_MAX_RATIO = MAX_ELEMENTS_PER_BYTE


def _check_frame(frame: memoryview, size: int) -> None:
    """Raise :class:`CorruptBlobError` unless ``frame`` declares ``size`` bytes of content and is
    long enough to expand to them (nothing is decompressed or allocated)."""
    if size > len(frame) * ZSTD_MAX_RATIO:
        raise CorruptBlobError("compressed plane too short for the header's dimensions")
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as e:
        raise CorruptBlobError(f"zstd: {e}") from e
    if declared != size:
        raise CorruptBlobError("compressed plane does not declare the header's size")


class LosslessScheme(Scheme):
    """Byte-plane split + zstd. Keys and values are laid out token-minor (``[L,2,H,D,T]``) so
    a channel's exponents, which vary slowly over tokens, sit next to each other; each byte
    plane (most significant first) is compressed on its own, or stored raw when zstd does not
    shrink it (mantissa low bytes are close to random)."""

    name, id, lossless = "lossless", 1, True
    DEFAULT_LEVEL = 3

    def encode(
        self, kv: torch.Tensor, level: int = DEFAULT_LEVEL, **_: Any
    ) -> tuple[dict[str, Any], bytes]:
        item = kv.element_size()
        t = kv.permute(0, 1, 3, 4, 2).contiguous()  # [L, 2, H, D, T]
        planes = np.ascontiguousarray(_as_bytes_view(t).T)  # [itemsize, N]; row 0 = low byte
        comp = _zstd_c(level)
        parts: list[bytes] = []
        sizes: list[int] = []
        for b in range(item - 1, -1, -1):  # most significant byte first
            raw = planes[b].tobytes()
            z = comp.compress(raw)
            if len(z) < len(raw):
                parts.append(z)
                sizes.append(len(z))
            else:
                parts.append(raw)
                sizes.append(-len(raw))  # negative: stored raw
        return {"level": level, "planes": sizes}, b"".join(parts)

    def decode(self, header: BlobHeader, payload: memoryview) -> torch.Tensor:
        """Every plane is checked against the header's size before anything of that size is
        allocated: a raw plane must be exactly that long, a zstd frame must declare that size
        and be long enough to expand to it (at most :data:`ZSTD_MAX_RATIO` times its length)."""
        item = torch.empty((), dtype=header.dtype).element_size()
        sizes = header.params.get("planes")
        n = header.num_elements
        if (
            not isinstance(sizes, list)
            or len(sizes) != item
            or not all(isinstance(s, int) for s in sizes)
            or sum(abs(s) for s in sizes) != len(payload)
        ):
            raise CorruptBlobError("lossless plane table does not match the payload")
        chunks: list[memoryview] = []
        off = 0
        for s in sizes:
            chunks.append(payload[off : off + abs(s)])
            off += abs(s)
            if s < 0 and -s != n:
                raise CorruptBlobError("raw plane has the wrong size")
            if s >= 0:
                _check_frame(chunks[-1], n)
        planes = np.empty((item, n), dtype=np.uint8)
        d = _zstd_d()
        for i, (s, chunk) in enumerate(zip(sizes, chunks, strict=True)):
            b = item - 1 - i
            if s < 0:
                planes[b] = np.frombuffer(chunk, dtype=np.uint8)
            else:
                try:
                    out = d.decompress(chunk, max_output_size=n)
                except zstandard.ZstdError as e:
                    raise CorruptBlobError(f"zstd: {e}") from e
                if len(out) != n:
                    raise CorruptBlobError("plane decompressed to the wrong size")
                planes[b] = np.frombuffer(out, dtype=np.uint8)
        L, _, T, H, D = header.shape
        flat = np.ascontiguousarray(planes.T).view(_NP_INT[item]).reshape(-1)
        t = _from_bytes(flat, header.dtype, (L, 2, H, D, T))
        return t.permute(0, 1, 4, 2, 3).contiguous()


# --- group quantization --------------------------------------------------------------------


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the last axis to a multiple by repeating its last element (keeps min/max)."""
    n = x.shape[-1]
    pad = (-n) % multiple
    if pad == 0:
        return x
    return torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)


@dataclass(frozen=True)
class _Groups:
    """Quantized groups: integer codes plus per-group scale (and minimum when asymmetric)."""

    codes: torch.Tensor  # uint8, same shape as the (padded) input
    scale: torch.Tensor  # [..., ngroups] float16/float32
    minimum: torch.Tensor | None


def _quantize(
    x: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype, dim: int = -1
) -> _Groups:
    """Quantize ``x`` per group, a group being the elements along ``dim`` (scales have ``x``'s
    shape without ``dim``). Reducing over a non-innermost ``dim`` of a contiguous tensor
    vectorises across the inner axes, which is several times faster than reducing over a
    permuted view."""
    qmax = (1 << bits) - 1
    mx, mn = x.amax(dim), x.amin(dim)  # (torch.aminmax over a dim is not vectorised)
    if sym:
        half = (1 << (bits - 1)) - 1
        scale = (torch.maximum(mx, mn.neg()) / half).to(scale_dtype)
        s = scale.float()
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        q = (x * inv.unsqueeze(dim)).round_().clamp_(-half, half).add_(half + 1)
        return _Groups(q.to(torch.uint8), scale, None)
    scale = ((mx - mn) / qmax).to(scale_dtype)
    mn_q = mn.to(scale_dtype)
    s, m = scale.float(), mn_q.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    q = ((x - m.unsqueeze(dim)) * inv.unsqueeze(dim)).round_().clamp_(0, qmax)
    return _Groups(q.to(torch.uint8), scale, mn_q)


def _dequantize(
    codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, bits: int
) -> torch.Tensor:
    s = scale.float().unsqueeze(-1)
    if minimum is None:
        half = (1 << (bits - 1)) - 1
        return torch.addcmul(s * -(half + 1), codes.float(), s)  # (codes - (half + 1)) * s
    return torch.addcmul(minimum.float().unsqueeze(-1), codes.float(), s)


def _dequantize_into(
    dest: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None,
    bits: int,
    dim: int = -1,
) -> None:
    """``dest`` (float32, any strides with a dense last axis) = :func:`_dequantize` of the
    same codes, bit for bit, a group being the elements along ``dim`` of ``codes`` (the
    scales have ``codes``' shape without ``dim``): the same ``addcmul`` (one rounding of
    ``base + codes * scale``, whatever the memory layout) with ``base`` broadcast into
    ``dest`` first, so that at most one operand is broadcast along the last axis, which keeps
    the kernel vectorised (two such operands make it scalar)."""
    s = scale.float().unsqueeze(dim)
    if minimum is None:
        half = (1 << (bits - 1)) - 1
        base = s * -(half + 1)
    else:
        base = minimum.float().unsqueeze(dim)
    dest.copy_(base.expand(dest.shape))
    dest.addcmul_(codes.float(), s)


class _Reader:
    """Sequential reads from a payload with length checks."""

    def __init__(self, payload: memoryview) -> None:
        self.buf, self.off = payload, 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.off + n > len(self.buf):
            raise CorruptBlobError("payload shorter than its header promises")
        out = self.buf[self.off : self.off + n]
        self.off += n
        return out

    def done(self) -> None:
        if self.off != len(self.buf):
            raise CorruptBlobError("trailing bytes after the payload")


class QuantScheme(Scheme):
    """Group quantization with keys per channel and values per token (see module docstring)."""

    lossless = False

    def __init__(self, name: str, scheme_id: int, bits: int, sym: bool, gk: int, gv: int) -> None:
        self.name, self.id = name, scheme_id  # type: ignore[misc]
        self.bits, self.sym, self.gk, self.gv = bits, sym, gk, gv

    def _value_group(self, head_dim: int, gv: int) -> int:
        return gv if head_dim % gv == 0 else head_dim

    def encode(
        self, kv: torch.Tensor, gk: int | None = None, gv: int | None = None, **_: Any
    ) -> tuple[dict[str, Any], bytes]:
        """The format's quantization: per group, the extremes set the scale (stored in
        float16 unless the chunk holds a magnitude of 30000 or more, or a non-finite value:
        then float32) and each element's code is ``round(x * (1 / scale))`` (int8, offset by
        128) or ``round((x - minimum) * (1 / scale))`` (int4), clamped to the code range.

        On the CPU with float16 scales :class:`CpuQuantizer` writes the payload; any other
        chunk takes :meth:`_encode_general`. Both write the same bytes."""
        gk = int(gk or self.gk)
        gv = self._value_group(kv.shape[-1], int(gv or self.gv))
        if (
            kv.device.type == "cpu"
            and sys.byteorder == "little"
            and ((self.bits == 8 and self.sym) or (self.bits == 4 and not self.sym))
        ):
            payload = CpuQuantizer(kv, self.bits, gk, gv).payload()
            if payload is not None:
                return {"gk": gk, "gv": gv, "sd": "f16"}, payload  # type: ignore[return-value]
        lo, hi = torch.aminmax(kv) if kv.numel() else (kv.new_zeros(()), kv.new_zeros(()))
        big = max(-float(lo), float(hi))
        scale_dtype = torch.float16 if big < 30000.0 else torch.float32
        params = {"gk": gk, "gv": gv, "sd": "f16" if scale_dtype == torch.float16 else "f32"}
        return params, self._encode_general(kv, gk, gv, scale_dtype)

    def _encode_general(
        self, kv: torch.Tensor, gk: int, gv: int, scale_dtype: torch.dtype
    ) -> bytes:
        """The format's reference encoder (any scale dtype)."""
        L, _two, T, H, D = kv.shape
        x = kv.float()
        # keys: grouped along T, quantized in their natural [L, T, H, D] layout and stored
        # channel-major ([L, H, D, T] codes, [L, H, D, ngroups] scales)
        k = x[:, 0]
        if T % gk:
            k = torch.cat([k, k[:, -1:].expand(L, gk - T % gk, H, D)], dim=1)
        kg = _quantize(k.reshape(L, -1, gk, H, D), self.bits, self.sym, scale_dtype, dim=2)
        kcodes = kg.codes.reshape(L, -1, H, D)[:, :T].permute(0, 2, 3, 1)
        kg = _Groups(
            kcodes,
            kg.scale.permute(0, 2, 3, 1).contiguous(),
            None if kg.minimum is None else kg.minimum.permute(0, 2, 3, 1).contiguous(),
        )
        # values: [L, T, H, D] grouped along D
        vg = _quantize(x[:, 1].reshape(L, T, H, D // gv, gv), self.bits, self.sym, scale_dtype)
        parts = [self._codes_bytes(kcodes), kg.scale.numpy().tobytes()]
        if kg.minimum is not None:
            parts.append(kg.minimum.numpy().tobytes())
        parts += [self._codes_bytes(vg.codes), vg.scale.numpy().tobytes()]
        if vg.minimum is not None:
            parts.append(vg.minimum.numpy().tobytes())
        return b"".join(parts)

    def _codes_bytes(self, codes: torch.Tensor) -> bytes:
        if self.bits == 4:
            return pack_nibbles(codes.contiguous())
        return codes.contiguous().numpy().tobytes()

    def decode(self, header: BlobHeader, payload: memoryview) -> torch.Tensor:
        out = torch.empty(header.shape, dtype=header.dtype)
        self.decode_into(header, payload, out[:, 0].transpose(1, 2), out[:, 1].transpose(1, 2))
        return out

    def decode_into(
        self, header: BlobHeader, payload: memoryview, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Exactly the values of the format's reference decoding (one float32 ``addcmul`` per
        element, ``base + codes * scale``, then one conversion to the destination's dtype).

        On the CPU, with float16 scales, the fast path of :class:`CpuDequantizer` runs; any
        other blob or device takes :meth:`_decode_into_general`."""
        sec = self._sections(header, payload)
        if (
            keys.device.type == "cpu"
            and values.device.type == "cpu"
            and sec.sd == "f16"
            and sys.byteorder == "little"
            and ((self.bits == 8 and self.sym) or (self.bits == 4 and not self.sym))
            and CpuDequantizer(sec, header.shape, self.bits).run(keys, values)
        ):
            return
        self._decode_into_general(header, sec, keys, values)

    def _decode_into_general(
        self,
        header: BlobHeader,
        sec: Sections,
        keys: torch.Tensor,
        values: torch.Tensor,
        staged: bool | None = None,
    ) -> None:
        """Codes and scales go to the destination's device as bytes (``staged``: see
        :meth:`_tensors`); dequantization runs there, in float32 (one ``addcmul`` per element,
        as :func:`_dequantize`: bit-exact with the format's reference decoding), straight into
        a float32 destination with dense rows, else into float32 scratch converted to the
        destination's dtype as it is copied."""
        parts = self._tensors(sec, header.shape, keys.device, staged)
        kcodes, kscale, kmin, vcodes, vscale, vmin, g = parts
        L, _, T, H, D = header.shape
        ngk = kscale.shape[-1]
        vd = values.transpose(1, 2)  # [L, T, H, D]: the stored order of the value codes
        if ngk * g != T:  # a padded last key group: the reference path
            k, v = self._dequantize(parts, header.shape)
            keys.copy_(k.transpose(2, 3))
            vd.copy_(v)
            return

        def f32(dest: torch.Tensor) -> torch.Tensor:
            if dest.dtype == torch.float32 and dest.stride(-1) == 1:
                return dest
            return torch.empty(dest.shape, dtype=torch.float32, device=dest.device)

        kdst, vdst = f32(keys), f32(vd)
        # keys: the codes are transposed to token-major as bytes (a quarter of the float
        # traffic), the scales and minima (one per channel and group) alongside
        kt = kcodes.transpose(2, 3).contiguous().view(L, H, ngk, g, D)

        def per_group(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.transpose(2, 3).contiguous()  # [L, H, groups, D]

        _dequantize_into(
            kdst.unflatten(2, (ngk, g)),
            kt,
            per_group(kscale),  # type: ignore[arg-type]
            per_group(kmin),
            self.bits,
            dim=-2,
        )
        _dequantize_into(vdst.unflatten(3, vcodes.shape[-2:]), vcodes, vscale, vmin, self.bits)
        if kdst is not keys:
            keys.copy_(kdst)  # converts to the destination's dtype
        if vdst is not vd:
            vd.copy_(vdst)

    def _dequantized(
        self, header: BlobHeader, payload: memoryview, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys ``[L, H, D, T]`` and values ``[L, T, H, D]``, float32, on ``device``."""
        parts = self._tensors(self._sections(header, payload), header.shape, device)
        return self._dequantize(parts, header.shape)

    def _dequantize(
        self, parts: tuple[Any, ...], shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kcodes, kscale, kmin, vcodes, vscale, vmin, g = parts
        L, _, T, H, D = shape
        ngk = kscale.shape[-1]
        kc = _pad_last(kcodes, g).reshape(L, H, D, ngk, g)
        k = _dequantize(kc, kscale, kmin, self.bits).reshape(L, H, D, -1)[..., :T]
        v = _dequantize(vcodes, vscale, vmin, self.bits).reshape(L, T, H, D)
        return k, v

    def _sections(self, header: BlobHeader, payload: memoryview) -> Sections:
        """The payload cut into its sections, each checked against the header's dimensions
        (nothing is allocated: the sections are views of ``payload``)."""
        p = header.params
        gk, gv, sd = p.get("gk"), p.get("gv"), p.get("sd")
        L, _, T, H, D = header.shape
        if not (
            isinstance(gk, int)
            and isinstance(gv, int)
            and gk > 0
            and gv > 0
            and D % gv == 0
            and sd in ("f16", "f32")
        ):
            raise CorruptBlobError("bad quantization parameters")
        ssize = 2 if sd == "f16" else 4
        ngk = -(-T // gk)
        n = L * H * D * T
        cbytes = (n + 1) // 2 if self.bits == 4 else n
        r = _Reader(payload)
        kcodes = r.take(cbytes)
        kscale = r.take(L * H * D * ngk * ssize)
        kmin = None if self.sym else r.take(L * H * D * ngk * ssize)
        vcodes = r.take(cbytes)
        vscale = r.take(L * T * H * (D // gv) * ssize)
        vmin = None if self.sym else r.take(L * T * H * (D // gv) * ssize)
        r.done()
        # a group longer than the chunk (ngk == 1) is the chunk's tokens: padding codes to
        # the group size would allocate from a parameter, not from the payload
        return Sections(
            kcodes, kscale, kmin, vcodes, vscale, vmin, min(gk, T), ngk, gv, sd, payload
        )

    def _tensors(
        self,
        sec: Sections,
        shape: tuple[int, ...],
        device: torch.device,
        staged: bool | None = None,
    ) -> tuple[Any, ...]:
        """The payload's codes and scales on ``device``: key codes ``[L, H, D, T]``, their
        scales and minima ``[L, H, D, groups]``, value codes ``[L, T, H, D / gv, gv]``, their
        scales and minima, and the key group length.

        ``staged`` (default: on any device but the CPU): the compressed payload goes to
        ``device`` whole, in one copy (from pinned memory on a GPU, see
        :func:`~kvaas.codec.payload.staged_on`), and 4-bit codes are unpacked there; else each
        section is read on the host (4-bit codes unpacked there) and moved on its own."""
        L, _, T, H, D = shape
        ngk, gv = sec.ngk, sec.gv
        sdt, snp = (torch.float16, np.float16) if sec.sd == "f16" else (torch.float32, np.float32)
        codes: Callable[[Any, int], torch.Tensor]
        scales: Callable[[Any], torch.Tensor]
        if staged if staged is not None else device.type != "cpu":
            parts: list[Any] = staged_sections(sec, staged_on(sec.payload, device))

            def codes(raw: torch.Tensor, count: int) -> torch.Tensor:
                return unpack_nibbles_on(raw, count) if self.bits == 4 else raw

            def scales(raw: torch.Tensor) -> torch.Tensor:
                return bytes_as(raw, sdt)
        else:
            parts = [sec.kcodes, sec.kscale, sec.kmin, sec.vcodes, sec.vscale, sec.vmin]

            def codes(buf: memoryview, count: int) -> torch.Tensor:
                return self._codes(buf, count).to(device, non_blocking=True)

            def scales(buf: memoryview) -> torch.Tensor:
                arr = np.frombuffer(buf, dtype=snp).copy()
                return torch.from_numpy(arr).view(sdt).to(device, non_blocking=True)

        kc, ks, km, vc, vs, vm = parts

        def scale(part: Any, shape: tuple[int, ...]) -> torch.Tensor | None:
            return None if part is None else scales(part).reshape(shape)

        return (
            codes(kc, L * H * D * T).reshape(L, H, D, T),
            scale(ks, (L, H, D, ngk)),
            scale(km, (L, H, D, ngk)),
            codes(vc, L * T * H * D).reshape(L, T, H, D // gv, gv),
            scale(vs, (L, T, H, D // gv)),
            scale(vm, (L, T, H, D // gv)),
            sec.g,
        )

    def _codes(self, buf: memoryview, count: int) -> torch.Tensor:
        if self.bits == 4:
            return unpack_nibbles(buf, count)
        return readonly_u8(buf)


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        RawScheme(),
        LosslessScheme(),
        QuantScheme("int8", 2, bits=8, sym=True, gk=128, gv=64),
        QuantScheme("int4", 3, bits=4, sym=False, gk=64, gv=64),
    )
}
SCHEMES_BY_ID: dict[int, Scheme] = {s.id: s for s in SCHEMES.values()}
