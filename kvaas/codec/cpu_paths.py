"""The CPU fast paths of int8 and int4 encoding and decoding (float16 scales): the same bytes
and bit-exact values as the general paths of :class:`kvaas.codec.schemes.QuantScheme`, with
fused eager operations over slices of layers that stay in a core's L2 cache, key codes
transposed as bytes, and per-thread scratch buffers (no allocation per chunk). The schemes
choose them and fall back to the general paths for every case they do not take."""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from kvaas.codec.payload import Sections, pack_nibbles, readonly_u8, unpack_nibbles

_local = threading.local()


#: ``1.5 * 2**23``: a float32 in ``[-2**22, 2**22]`` plus this rounds to the nearest integer
#: (ties to even, as ``torch.round``), which then sits in the low bits of the sum's encoding
#: (the constant's own low byte is zero).
_ROUNDER = 12582912.0


class CpuQuantizer:
    """The CPU fast path of quantized encoding, for chunks whose scales are float16: int8
    (symmetric) and int4 (asymmetric); the same bytes as :meth:`QuantScheme._encode_general`.

    The group extremes of keys and values go to one buffer, from which the chunk's extremes
    (the scale dtype's test) and every scale, minimum and reciprocal come, by the reference's
    float32 operations. Codes: ``y = x * inv`` (int4: ``(x - minimum) * inv``), clamped to the
    code range (the same as rounding then clamping, the bounds being integers; int8 skips it
    when every scale is zero or a normal float16, which bounds ``|y|`` by 127.07), then
    ``y + 1.5 * 2**23`` (int8: ``+ 128`` more) rounds to the nearest integer, ties to even,
    exactly as ``round``, and the low byte of the sum's bits is the code: one integer
    conversion instead of a rounding and a float-to-byte conversion. Key codes are made
    token-major (int4: packed two tokens to a byte there when the chunk's length is even) and
    transposed to the stored channel-major order as bytes."""

    def __init__(self, kv: torch.Tensor, bits: int, gk: int, gv: int) -> None:
        self.kv, self.bits, self.gv = kv, bits, gv
        self.L, _, self.T, self.H, self.D = kv.shape
        self.g = min(gk, self.T)
        self.ngk = -(-self.T // gk)

    def payload(self) -> memoryview | None:
        """The payload, or ``None`` when the chunk needs float32 scales (nothing else is
        decided or written then)."""
        L, T, H, D, ngk, gv = self.L, self.T, self.H, self.D, self.ngk, self.gv
        n = L * T * H * D
        nk, nv = L * ngk * H * D, L * T * H * (D // gv)
        x = _scratch("x", 2 * n, torch.float32).view(self.kv.shape)
        x.copy_(self.kv)
        k, v = x[:, 0], x[:, 1].unflatten(3, (D // gv, gv))
        ext = torch.empty(2, nk + nv)  # group maxima, then minima: keys, then values
        kext = ext[:, :nk].unflatten(1, (L, ngk, H, D))
        full, tail = T // self.g, T % self.g
        kgroups = k.narrow(1, 0, full * self.g).unflatten(1, (full, self.g))  # full >= 1
        ktail = k.narrow(1, full * self.g, tail) if tail else None
        for row, op in ((0, torch.amax), (1, torch.amin)):
            if ktail is None:
                op(kgroups, 2, out=kext[row])
            else:
                kext[row].copy_(torch.cat([op(kgroups, 2), op(ktail, 1, keepdim=True)], 1))
            op(v, -1, out=ext[row, nk:].view(L, T, H, D // gv))
        lo, hi = torch.aminmax(ext)
        if not max(-float(lo), float(hi)) < 30000.0:  # the reference's test, as written
            return None
        if self.bits == 8:
            scale = (torch.maximum(ext[0], ext[1].neg()) / 127).to(torch.float16)
            mn_q, m = None, None
        else:
            scale = ((ext[0] - ext[1]) / 15).to(torch.float16)
            mn_q = ext[1].to(torch.float16)
            m = mn_q.float()
        s = scale.float()
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        clamp = self.bits == 4 or bool(inv.max() > 16384.0)  # a subnormal scale
        cbytes = (n + 1) // 2 if self.bits == 4 else n
        stored = [scale] if mn_q is None else [scale, mn_q]
        per = len(stored)  # scales, or scales and minima
        out = np.empty(2 * cbytes + 2 * per * (nk + nv), dtype=np.uint8)
        kc, rest = out[:cbytes], out[cbytes:]
        ks, rest = rest[: 2 * per * nk].view(np.float16), rest[2 * per * nk :]
        vc, vs = rest[:cbytes], rest[cbytes:].view(np.float16)
        # the stored scales (and minima): keys [L, H, D, groups], values [L, T, H, D / gv]
        for i, t in enumerate(stored):
            np.copyto(
                ks[i * nk : (i + 1) * nk].reshape(L, H, D, ngk),
                t[:nk].view(L, ngk, H, D).permute(0, 2, 3, 1).numpy(),
            )
            np.copyto(vs[i * nv : (i + 1) * nv], t[nk:].numpy())
        # y = (x - minimum) * inv, group by group
        kinv = inv[:nk].view(L, ngk, H, D)
        km = None if m is None else m[:nk].view(L, ngk, H, D)
        if km is not None:
            kgroups.sub_(km.narrow(1, 0, full).unsqueeze(2))
        kgroups.mul_(kinv.narrow(1, 0, full).unsqueeze(2))
        if ktail is not None:
            if km is not None:
                ktail.sub_(km.narrow(1, full, 1))
            ktail.mul_(kinv.narrow(1, full, 1))
        if m is not None:
            v.sub_(m[nk:].view(L, T, H, D // gv, 1))
        v.mul_(inv[nk:].view(L, T, H, D // gv, 1))
        self._keys(k, kc, clamp)
        self._values(x[:, 1], vc, clamp)
        return out.data

    def _codes(self, y: torch.Tensor, out: torch.Tensor, clamp: bool) -> None:
        """``out`` (uint8) = the codes of the scaled values ``y`` (float32, overwritten)."""
        if self.bits == 8:
            if clamp:
                y.clamp_(-127, 127)
            y.add_(_ROUNDER + 128)
        else:
            y.clamp_(0, 15).add_(_ROUNDER)
        out.copy_(y.view(torch.int32))  # the low byte (a conversion to uint8 wraps)

    def _keys(self, k: torch.Tensor, codes_out: np.ndarray, clamp: bool) -> None:
        """``k``: the scaled keys, float32 ``[L, T, H, D]`` (overwritten)."""
        L, T, H, D = self.L, self.T, self.H, self.D
        codes = _scratch("codes", L * T * H * D, torch.uint8).view(L, T, H, D)
        self._codes(k, codes, clamp)
        if self.bits == 8:
            np.copyto(codes_out.reshape(L, H, D, T), codes.numpy().transpose(0, 2, 3, 1))
        elif T % 2 == 0:  # two tokens of a channel to a byte, low nibble first
            packed = _scratch("packed", L * T * H * D // 2, torch.uint8).view(L, T // 2, H, D)
            torch.bitwise_left_shift(codes[:, 1::2], 4, out=packed).bitwise_or_(codes[:, 0::2])
            np.copyto(codes_out.reshape(L, H, D, T // 2), packed.numpy().transpose(0, 2, 3, 1))
        else:  # an odd length: pairs straddle channels
            cm = codes.permute(0, 2, 3, 1).contiguous()
            np.copyto(codes_out, np.frombuffer(pack_nibbles(cm), dtype=np.uint8))

    def _values(self, v: torch.Tensor, codes_out: np.ndarray, clamp: bool) -> None:
        """``v``: the scaled values, float32 ``[L, T, H, D]`` (overwritten)."""
        L, T, H, D = self.L, self.T, self.H, self.D
        n = L * T * H * D
        if self.bits == 8:
            self._codes(v, torch.from_numpy(codes_out).view(L, T, H, D), clamp)
            return
        codes = _scratch("codes", n, torch.uint8).view(L, T, H, D)
        self._codes(v, codes, clamp)
        if n % 2:  # an odd count: the last byte pads with a zero code
            np.copyto(codes_out, np.frombuffer(pack_nibbles(codes), dtype=np.uint8))
            return
        # two codes as one little-endian 16-bit word: low | high << 8 -> low | high << 4
        w = codes.view(-1).view(torch.int16)
        w2 = _scratch("wide", n // 2, torch.int16)
        torch.bitwise_right_shift(w, 4, out=w2).bitwise_or_(w)
        torch.from_numpy(codes_out).copy_(w2)  # the low byte


#: Elements of keys (or values) one step of the CPU fast path works on: a slice of layers whose
#: float32 scratch (512 KiB) stays in a core's L2 cache between the step's operations.
_SLICE_ELEMENTS = 1 << 17
#: Largest scratch buffer (elements) a thread keeps for its next call; larger ones are freed.
_SCRATCH_KEEP = 1 << 22


def _scratch(slot: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor of ``n`` elements of ``dtype``, private to the calling thread and handed
    out again by the next call for the same ``slot`` (so its user must be done with it by
    then): the fast paths allocate no buffers per chunk."""
    pool: dict[str, torch.Tensor] | None = getattr(_local, "scratch", None)
    if pool is None:
        pool = _local.scratch = {}
    t = pool.get(slot)
    if t is None or t.numel() < n or t.dtype != dtype:
        t = torch.empty(max(n, 1), dtype=dtype)
        if n <= _SCRATCH_KEEP:
            pool[slot] = t
    return t[:n]


def _layer_slices(layers: int, per_layer: int) -> list[tuple[int, int]]:
    step = max(1, _SLICE_ELEMENTS // max(per_layer, 1))
    return [(a, min(a + step, layers)) for a in range(0, layers, step)]


def _dense_rows(t: torch.Tensor) -> bool:
    """Whether the last two axes of ``t`` are one dense block (rows back to back)."""
    return t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]


class CpuDequantizer:
    """The CPU fast path of quantized decoding, for float16 scales: int8 (symmetric) and int4
    (asymmetric). Bit-exact with the reference ``addcmul(base, codes, scale)``:

    - a float16 scale times a code (at most 8 bits) is exact in float32 (11 + 8 < 24
      significant bits), so ``minimum + code * scale`` rounds once whatever the order of the
      operations (int4: an ``addcmul``, or a multiply then an add);
    - int8's ``-128 * scale + code * scale`` is then ``(code - 128) * scale`` exactly, and
      ``code - 128`` is the code's byte read as a signed integer after flipping its top bit;
      the sign of a zero result agrees only when the scale is positive (the reference gives
      ``+0.0`` where this gives ``-0.0`` for a zero or negative scale), so :meth:`run` refuses
      an int8 blob with any scale that is not positive and finite (a group of zeros has a
      zero scale), and an int4 blob with any non-finite scale or minimum (no encoder writes
      those): such blobs take the general path.

    Work runs over slices of layers sized to stay in the L2 cache, in the destination's token
    order: key codes are transposed as bytes (packed int4 bytes before unpacking: half the
    bytes), dequantized in float32 scratch (or straight in a float32 destination) with every
    scale broadcast over a non-innermost axis or in a two-operand multiply, then converted
    into the destination once."""

    def __init__(self, sec: Sections, shape: tuple[int, ...], bits: int) -> None:
        self.sec, self.bits = sec, bits
        self.L, _, self.T, self.H, self.D = shape

    def _f32(self, buf: memoryview | None, shape: tuple[int, ...]) -> torch.Tensor | None:
        if buf is None:
            return None
        return torch.from_numpy(np.frombuffer(buf, dtype=np.float16).reshape(shape).copy()).float()

    def _usable(self, scale: torch.Tensor, minimum: torch.Tensor | None) -> bool:
        if self.bits == 8:
            lo, hi = torch.aminmax(scale)
            return bool(lo > 0) and bool(hi < float("inf"))
        assert minimum is not None
        return math.isfinite(float(scale.sum())) and math.isfinite(float(minimum.sum()))

    def run(self, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """Decode into ``keys`` and ``values`` (``[L, H, T, D]``, any strides); ``False``
        (nothing written) when the blob's scales rule the fast path out."""
        sec, L, T, H, D = self.sec, self.L, self.T, self.H, self.D
        kscale = self._f32(sec.kscale, (L, H, D, sec.ngk))
        vscale = self._f32(sec.vscale, (L, T, H, D // sec.gv))
        kmin = self._f32(sec.kmin, (L, H, D, sec.ngk))
        vmin = self._f32(sec.vmin, (L, T, H, D // sec.gv))
        assert kscale is not None and vscale is not None
        if not (self._usable(kscale, kmin) and self._usable(vscale, vmin)):
            return False
        self._keys(keys, kscale, kmin)
        self._values(values.transpose(1, 2), vscale, vmin)
        return True

    def _keys(self, keys: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> None:
        L, T, H, D, g = self.L, self.T, self.H, self.D, self.sec.g
        # token-major per layer ([L, T, H, D], the canonical chunk's order) unless the
        # destination is head-major with dense rows ([L, H, T, D], the connector's staging)
        if _dense_rows(keys.transpose(1, 2)) or not _dense_rows(keys):
            perm, dest, tax = (0, 3, 1, 2), keys.transpose(1, 2), 1
        else:
            perm, dest, tax = (0, 1, 3, 2), keys, 2
        packed = self.bits == 4 and T % 2 == 0
        if self.bits == 4 and not packed:
            src = unpack_nibbles(self.sec.kcodes, L * H * D * T).numpy().reshape(L, H, D, T)
        else:
            src = np.frombuffer(self.sec.kcodes, dtype=np.uint8)
            src = src.reshape(L, H, D, T // 2 if packed else T)
        s = _permuted_f32(scale, perm)
        m = None if minimum is None else _permuted_f32(minimum, perm)
        for a, b in _layer_slices(L, H * D * T):
            shape = (b - a, *(dest.shape[i] for i in range(1, 4)))
            n = (b - a) * H * D * T
            codes = _scratch("codes", n, torch.uint8).view(shape)
            if packed:
                half = list(shape)
                half[tax] //= 2
                p = _scratch("packed", n // 2, torch.uint8).view(half)
                np.copyto(p.numpy(), src[a:b].transpose(perm))
                pairs = codes.unflatten(tax, (T // 2, 2))
                torch.bitwise_and(p, 0x0F, out=pairs.select(tax + 1, 0))
                torch.bitwise_right_shift(p, 4, out=pairs.select(tax + 1, 1))
            elif self.bits == 8:  # code - 128, read as a signed byte, as it is transposed
                np.bitwise_xor(src[a:b].transpose(perm), 0x80, out=codes.numpy())
            else:
                np.copyto(codes.numpy(), src[a:b].transpose(perm))
            self._dequantize(codes, dest[a:b], tax, g, s[a:b], None if m is None else m[a:b])

    def _values(self, vd: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> None:
        """``vd``: the destination as ``[L, T, H, D]`` (the codes' order)."""
        L, T, H, D, gv = self.L, self.T, self.H, self.D, self.sec.gv
        per = T * H * D
        packed = self.bits == 4 and per % 2 == 0
        if self.bits == 4 and not packed:
            src = unpack_nibbles(self.sec.vcodes, L * per)
        else:
            src = readonly_u8(self.sec.vcodes)
        for a, b in _layer_slices(L, per):
            n = (b - a) * per
            if packed:
                w = _scratch("wide", n // 2, torch.int16)
                w2 = _scratch("wide2", n // 2, torch.int16)
                w.copy_(src[a * per // 2 : b * per // 2])
                # each byte widened to 16 bits, its high nibble moved up one byte: read as
                # bytes (little-endian), the words are the codes in order
                torch.bitwise_left_shift(w, 4, out=w2).bitwise_or_(w).bitwise_and_(0x0F0F)
                codes = w2.view(torch.uint8)
            elif self.bits == 8:
                codes = _scratch("codes", n, torch.uint8)
                torch.bitwise_xor(src[a * per : b * per], 0x80, out=codes)  # code - 128
            else:
                codes = src[a * per : b * per]
            codes = codes.view(b - a, T, H, D)
            s, m = scale[a:b].unsqueeze(-1), None if minimum is None else minimum[a:b].unsqueeze(-1)
            self._dequantize(codes, vd[a:b], 3, gv, s, m, inner=True)

    def _dequantize(
        self,
        codes: torch.Tensor,
        dest: torch.Tensor,
        gax: int,
        g: int,
        scale: torch.Tensor,
        minimum: torch.Tensor | None,
        inner: bool = False,
    ) -> None:
        """``dest`` = dequantized ``codes`` (``dest``'s shape; int8: the codes with their top
        bit flipped, read here as signed bytes), groups of ``g`` along axis ``gax``;
        ``scale`` and ``minimum`` have the groups on ``gax`` (one per group, the last
        possibly short), ``inner`` when ``gax`` is the last axis (then they already carry the
        broadcast axis)."""
        if self.bits == 8:
            codes = codes.view(torch.int8)
        f = dest if dest.dtype == torch.float32 else _scratch("f32", codes.numel(), torch.float32)
        f = f.view(codes.shape) if f is not dest else f
        f.copy_(codes)
        if inner:
            fg = f.unflatten(gax, (-1, g))
            fg.mul_(scale)
            if minimum is not None:
                fg.add_(minimum)
        else:
            n = f.shape[gax]
            full = n // g
            if full:
                fg = f.narrow(gax, 0, full * g).unflatten(gax, (full, g))
                sg = scale.narrow(gax, 0, full).unsqueeze(gax + 1)
                if minimum is None:
                    fg.mul_(sg)
                else:
                    torch.addcmul(minimum.narrow(gax, 0, full).unsqueeze(gax + 1), fg, sg, out=fg)
            if n % g:
                ft = f.narrow(gax, full * g, n % g)
                st = scale.narrow(gax, full, 1)
                if minimum is None:
                    ft.mul_(st)
                else:
                    torch.addcmul(minimum.narrow(gax, full, 1), ft, st, out=ft)
        if f is not dest:
            dest.copy_(f)


def _permuted_f32(x: torch.Tensor, perm: tuple[int, ...]) -> torch.Tensor:
    return x.permute(perm).contiguous()
