"""Compression schemes. Each turns a canonical KV chunk into ``(params, payload)`` and back.

- ``none``: the raw bytes (bit-exact).
- ``lossless``: byte planes of a token-minor layout, each plane zstd-compressed (bit-exact).
- ``int8``: symmetric 8-bit; keys per channel (groups along tokens), values per token.
- ``int4``: asymmetric 4-bit (min + scale per group, fp16); keys per channel in groups of
  ``gk`` tokens, values per token in groups of ``gv`` channels; two codes per byte.

All work is vectorised with torch; nothing loops over tokens or channels.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import zstandard

from kvaas.codec.container import MAX_ELEMENTS_PER_BYTE, BlobHeader
from kvaas.codec.errors import CorruptBlobError

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


class RawScheme(Scheme):
    name, id, lossless = "none", 0, True

    def encode(self, kv: torch.Tensor, **params: Any) -> tuple[dict[str, Any], bytes]:
        return {}, _as_bytes_view(kv).tobytes()

    def decode(self, header: BlobHeader, payload: memoryview) -> torch.Tensor:
        if len(payload) != header.num_elements * torch.empty((), dtype=header.dtype).element_size():
            raise CorruptBlobError("raw payload size does not match the header")
        return _from_bytes(payload, header.dtype, header.shape)


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


def _pack_nibbles(codes: torch.Tensor) -> bytes:
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).numpy().tobytes()


def _unpack_nibbles(buf: memoryview, count: int) -> torch.Tensor:
    packed = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8).copy())
    out = torch.empty(packed.numel() * 2, dtype=torch.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:count]


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
        gk = int(gk or self.gk)
        L, _two, T, H, D = kv.shape
        gv = self._value_group(D, int(gv or self.gv))
        lo, hi = torch.aminmax(kv) if kv.numel() else (kv.new_zeros(()), kv.new_zeros(()))
        big = max(-float(lo), float(hi))
        x = kv.float()
        scale_dtype = torch.float16 if big < 30000.0 else torch.float32
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
        params = {"gk": gk, "gv": gv, "sd": "f16" if scale_dtype == torch.float16 else "f32"}
        return params, b"".join(parts)

    def _codes_bytes(self, codes: torch.Tensor) -> bytes:
        if self.bits == 4:
            return _pack_nibbles(codes.contiguous())
        return codes.contiguous().numpy().tobytes()

    def _codes_from(self, r: _Reader, count: int) -> torch.Tensor:
        if self.bits == 4:
            return _unpack_nibbles(r.take((count + 1) // 2), count)
        return torch.from_numpy(np.frombuffer(r.take(count), dtype=np.uint8).copy())

    def decode(self, header: BlobHeader, payload: memoryview) -> torch.Tensor:
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
        sdt, snp = (torch.float16, np.float16) if sd == "f16" else (torch.float32, np.float32)
        ssize = 2 if sd == "f16" else 4
        ngk = -(-T // gk)
        r = _Reader(payload)

        def scales(n: int, shape: tuple[int, ...]) -> torch.Tensor:
            arr = np.frombuffer(r.take(n * ssize), dtype=snp).copy()
            return torch.from_numpy(arr).view(sdt).reshape(shape)

        kcodes = self._codes_from(r, L * H * D * T).reshape(L, H, D, T)
        kscale = scales(L * H * D * ngk, (L, H, D, ngk))
        kmin = None if self.sym else scales(L * H * D * ngk, (L, H, D, ngk))
        vcodes = self._codes_from(r, L * T * H * D).reshape(L, T, H, D // gv, gv)
        vscale = scales(L * T * H * (D // gv), (L, T, H, D // gv))
        vmin = None if self.sym else scales(L * T * H * (D // gv), (L, T, H, D // gv))
        r.done()
        # a group longer than the chunk (ngk == 1) is the chunk's tokens: padding codes to
        # the group size would allocate from a parameter, not from the payload
        g = min(gk, T)
        kc = _pad_last(kcodes, g).reshape(L, H, D, ngk, g)
        k = _dequantize(kc, kscale, kmin, self.bits).reshape(L, H, D, -1)[..., :T]
        v = _dequantize(vcodes, vscale, vmin, self.bits).reshape(L, T, H, D)
        out = torch.empty((L, 2, T, H, D), dtype=header.dtype)
        out[:, 0].copy_(k.permute(0, 3, 1, 2))  # converts to the output dtype as it copies
        out[:, 1].copy_(v)
        return out


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
