"""How many bytes a model's KV takes, raw and stored: the one place that sizes a chunk.

- :func:`kv_dtype`: the dtype the engine keeps KV in (``auto``: the checkpoint's).
- :class:`KVShape` / :func:`read_kv_shape`: layers x KV heads x head dim and the dtype, read
  from a Hugging Face ``config.json`` (a multimodal ``text_config`` is used when present).
- :func:`chunk_size`: the bytes of one stored chunk for a scheme: its codec container plus
  :data:`SEAL_OVERHEAD_BYTES` (every stored chunk is encrypted). The fixed-size schemes
  (``none``, ``int8``, ``int4``) encode every chunk of a shape to the same size, measured by
  encoding one chunk, so ``expected == bound`` and ``exact``. ``lossless`` depends on the data:
  ``expected`` uses its measured ratio (what a price estimate shows), ``bound`` is the ``none``
  size it never exceeds (what a quota reserves until the real bytes are known).

Callers: storage quotas reserve ``bound``, the cost estimate shows ``expected``, the benches
read ``bytes_per_token``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, cast, get_args

#: Measured compression of each scheme against bf16 KV (``bench/results/codec.json``,
#: Qwen2.5-0.5B-shaped chunks). Only ``lossless``'s is used: the others are exact.
MEASURED_RATIO_VS_BF16 = {"none": 1.0, "lossless": 1.8149, "int8": 1.9541, "int4": 3.5553}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
#: Bytes that encryption at rest adds to each stored chunk: the header and tag of
#: :mod:`kvaas.store.crypto` (``OVERHEAD`` there; the store tests compare the two).
SEAL_OVERHEAD_BYTES = 53


KVDtype = Literal["float32", "float16", "bfloat16"]
_DTYPE_ALIASES = {"float": "float32", "half": "float16"}


def kv_dtype(model_dir: Path, dtype: str) -> KVDtype:
    """The dtype the engine keeps KV in for the setting ``dtype`` (``auto``: the checkpoint's).
    ``ValueError`` for a dtype the codec cannot store."""
    name = dtype
    if dtype == "auto":
        cfg = json.loads((model_dir / "config.json").read_text())
        name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in get_args(KVDtype):
        raise ValueError(f"KV dtype {name!r} is not supported; use one of {get_args(KVDtype)}")
    return cast(KVDtype, name)


@dataclass(frozen=True)
class KVShape:
    """The KV of one token: ``layers x kv_heads x head_dim`` keys and as many values."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str

    @property
    def bytes_per_token(self) -> int:
        """Uncompressed: layers x KV heads x head dim x 2 (K and V) x bytes per element."""
        return self.layers * self.kv_heads * self.head_dim * 2 * DTYPE_BYTES.get(self.dtype, 2)


def kv_shape(config: dict[str, Any], dtype: str) -> KVShape:
    """The KV shape of a parsed Hugging Face ``config.json``."""
    cfg = config.get("text_config", config)
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    return KVShape(int(cfg["num_hidden_layers"]), kv_heads, head_dim, dtype)


@lru_cache(maxsize=16)
def read_kv_shape(model_dir: Path, dtype: str) -> KVShape:
    """The KV shape of the checkpoint in ``model_dir`` with the engine's dtype setting (read
    once per process: a served model's directory does not change under it)."""
    config = json.loads((model_dir / "config.json").read_text())
    return kv_shape(config, kv_dtype(model_dir, dtype))


@dataclass(frozen=True)
class ChunkSize:
    """Bytes of one stored chunk: ``expected`` (what it will take), ``bound`` (what it can
    take at most) and whether ``expected`` is exact."""

    expected: int
    bound: int
    exact: bool


def chunk_size(shape: KVShape, chunk_tokens: int, scheme: str) -> ChunkSize:
    """The stored size of one ``chunk_tokens``-token chunk of ``shape`` with ``scheme``."""
    if scheme == "lossless":
        bound = _encoded_bytes(shape, chunk_tokens, "none") + SEAL_OVERHEAD_BYTES
        raw = shape.bytes_per_token * chunk_tokens
        expected = round(raw / MEASURED_RATIO_VS_BF16["lossless"]) + SEAL_OVERHEAD_BYTES
        return ChunkSize(min(bound, expected), bound, False)
    n = _encoded_bytes(shape, chunk_tokens, scheme) + SEAL_OVERHEAD_BYTES
    return ChunkSize(n, n, True)


@lru_cache(maxsize=64)
def _encoded_bytes(shape: KVShape, chunk_tokens: int, scheme: str) -> int:
    """Encode one chunk of zeros: the fixed-size schemes' blobs depend on the shape only."""
    import torch

    from kvaas import codec

    dt = {"float32": torch.float32, "float16": torch.float16}.get(shape.dtype, torch.bfloat16)
    kv = torch.zeros((shape.layers, 2, chunk_tokens, shape.kv_heads, shape.head_dim), dtype=dt)
    return len(codec.encode(kv, scheme))
