"""The first release's decoder of the KV codec, kept as the reference the codec's faster paths
must match bit for bit (``tests/codec``): the stored format may never change meaning."""

from __future__ import annotations

import numpy as np
import torch

from kvaas.codec.container import payload_view, read_header
from kvaas.codec.schemes import SCHEMES_BY_ID


def reference_decode(blob: bytes) -> torch.Tensor:
    """The chunk ``blob`` holds, decoded as the first release decoded it: nibbles unpacked by
    strided writes, ``addcmul`` with the base and the scale broadcast, a transposing copy into
    the canonical chunk (``none`` and ``lossless`` by their scheme's own decoder)."""
    h = read_header(blob)
    s = SCHEMES_BY_ID[h.scheme_id]
    if s.name in ("none", "lossless"):
        return s.decode(h, payload_view(blob, h))
    bits, sym = s.bits, s.sym  # type: ignore[attr-defined]
    p = payload_view(blob, h)
    gk, gv, sd = h.params["gk"], h.params["gv"], h.params["sd"]
    L, _, T, H, D = h.shape
    sdt, snp, ss = (torch.float16, np.float16, 2) if sd == "f16" else (torch.float32, np.float32, 4)
    ngk, off = -(-T // gk), 0

    def take(n: int) -> memoryview:
        nonlocal off
        off += n
        return p[off - n : off]

    def codes(count: int) -> torch.Tensor:
        if bits == 4:
            packed = torch.from_numpy(np.frombuffer(take((count + 1) // 2), np.uint8).copy())
            out = torch.empty(packed.numel() * 2, dtype=torch.uint8)
            out[0::2] = packed & 0x0F
            out[1::2] = packed >> 4
            return out[:count]
        return torch.from_numpy(np.frombuffer(take(count), np.uint8).copy())

    def scales(n: int, shape: tuple[int, ...]) -> torch.Tensor:
        arr = np.frombuffer(take(n * ss), dtype=snp).copy()
        return torch.from_numpy(arr).view(sdt).reshape(shape)

    def deq(c: torch.Tensor, sc: torch.Tensor, mn: torch.Tensor | None) -> torch.Tensor:
        f = sc.float().unsqueeze(-1)
        if mn is None:
            half = (1 << (bits - 1)) - 1
            return torch.addcmul(f * -(half + 1), c.float(), f)
        return torch.addcmul(mn.float().unsqueeze(-1), c.float(), f)

    kc = codes(L * H * D * T).reshape(L, H, D, T)
    ks = scales(L * H * D * ngk, (L, H, D, ngk))
    km = None if sym else scales(L * H * D * ngk, (L, H, D, ngk))
    vc = codes(L * T * H * D).reshape(L, T, H, D // gv, gv)
    vs = scales(L * T * H * (D // gv), (L, T, H, D // gv))
    vm = None if sym else scales(L * T * H * (D // gv), (L, T, H, D // gv))
    g = min(gk, T)
    pad = (-T) % g
    if pad:
        kc = torch.cat([kc, kc[..., -1:].expand(*kc.shape[:-1], pad)], dim=-1)
    k = deq(kc.reshape(L, H, D, ngk, g), ks, km).reshape(L, H, D, -1)[..., :T]
    v = deq(vc, vs, vm).reshape(L, T, H, D)
    out = torch.empty(h.shape, dtype=h.dtype)
    out[:, 0].copy_(k.permute(0, 3, 1, 2))
    out[:, 1].copy_(v)
    return out


class Staging:
    """Token-major decode destinations, as the connector's staging buffer slices them: keys
    ``[L, H, T, D]`` dense and values ``[L, T, H, D]`` memory seen as ``[L, H, T, D]``, each a
    slice (tokens 3 to 3 + T) of a wider buffer filled with 7.0, for a chunk of ``shape``
    ``[L, 2, T, H, D]``."""

    FILL = 7.0

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        layers, _, self.tokens, heads, dim = shape
        self._kbuf = torch.full((layers, heads, self.tokens + 5, dim), self.FILL, dtype=dtype)
        self._vbuf = torch.full((layers, self.tokens + 5, heads, dim), self.FILL, dtype=dtype)
        self.keys = self._kbuf[:, :, 3 : 3 + self.tokens]
        self.values = self._vbuf[:, 3 : 3 + self.tokens].transpose(1, 2)

    def untouched_outside(self) -> bool:
        """Nothing outside the two destination slices was written."""
        t, k, v = self.tokens, self._kbuf, self._vbuf
        return bool(
            torch.all(k[:, :, :3] == self.FILL)
            and torch.all(k[:, :, 3 + t :] == self.FILL)
            and torch.all(v[:, :3] == self.FILL)
            and torch.all(v[:, 3 + t :] == self.FILL)
        )
