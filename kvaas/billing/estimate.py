"""What a cache would cost, and after how many attaches it pays off (pure functions).

Without a cache, each of ``n`` requests prefills the whole prefix: ``n * tokens * prefill``.
With one: the create prefills it once, storage is paid for the TTL, and each attach reads the
stored part (whole chunks) at the cached-read price and prefills the rest. Break-even is the
smallest ``n`` where the cache costs no more. Free tiers and minimum charges are left out: these
are marginal prices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache

from kvaas.billing.pricebook import SECONDS_PER_HOUR, TOKENS_PER_MTOK, PriceVersion

#: Measured compression of each codec scheme against bf16 KV (``bench/results/codec.json``,
#: Qwen2.5-0.5B-shaped chunks). Used for ``lossless``, whose size depends on the data.
MEASURED_RATIO_VS_BF16 = {"none": 1.0, "lossless": 1.8149, "int8": 1.9541, "int4": 3.5553}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Economics:
    tokens: int
    cached_tokens: int
    storage_per_hour: Decimal
    storage_for_ttl: Decimal
    create: Decimal
    attach: Decimal
    resend: Decimal
    break_even_attaches: int | None

    def with_cache(self, attaches: int) -> Decimal:
        return self.create + self.storage_for_ttl + attaches * self.attach

    def without_cache(self, attaches: int) -> Decimal:
        return attaches * self.resend


def economics(
    tokens: int,
    cached_tokens: int,
    ttl_seconds: int,
    storage_class: str,
    prices: PriceVersion,
) -> Economics:
    """Costs (exact decimals in the price book's currency) of caching ``tokens`` tokens for
    ``ttl_seconds`` against re-sending them; ``cached_tokens`` of them are read from the cache
    on attach (whole chunks), the rest prefilled."""
    mtok = Decimal(TOKENS_PER_MTOK)
    per_hour = Decimal(tokens) * prices.storage_per_mtok_hour.of(storage_class) / mtok
    storage = per_hour * Decimal(ttl_seconds) / Decimal(SECONDS_PER_HOUR)
    create = Decimal(tokens) * prices.prefill_per_mtok / mtok + prices.cache_creation
    attach = (
        Decimal(cached_tokens) * prices.cached_read_per_mtok
        + Decimal(tokens - cached_tokens) * prices.prefill_per_mtok
    ) / mtok
    resend = Decimal(tokens) * prices.prefill_per_mtok / mtok
    gain = resend - attach
    n: int | None = None
    if gain > 0:
        n = max(1, math.ceil((create + storage) / gain))
    return Economics(tokens, cached_tokens, per_hour, storage, create, attach, resend, n)


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str

    @property
    def bytes_per_token(self) -> int:
        """Uncompressed: layers x kv heads x head dim x 2 (K and V) x bytes per element."""
        return self.layers * self.kv_heads * self.head_dim * 2 * DTYPE_BYTES.get(self.dtype, 2)


def kv_shape(config: dict[str, object], dtype: str) -> KVShape:
    """The KV shape of a Hugging Face ``config.json``."""
    heads = int(config["num_attention_heads"])  # type: ignore[call-overload]
    kv_heads = int(config.get("num_key_value_heads") or heads)  # type: ignore[call-overload]
    head_dim = config.get("head_dim") or int(config["hidden_size"]) // heads  # type: ignore[call-overload]
    return KVShape(int(config["num_hidden_layers"]), kv_heads, int(head_dim), dtype)  # type: ignore[call-overload]


@lru_cache(maxsize=64)
def chunk_blob_bytes(shape: KVShape, chunk_tokens: int, scheme: str) -> tuple[int, bool]:
    """Bytes of one stored chunk with ``scheme`` and whether that is exact: ``none``, ``int8``
    and ``int4`` sizes depend on the shape only (measured by encoding one chunk); ``lossless``
    depends on the data and is estimated with its measured ratio."""
    if scheme == "lossless":
        raw = shape.bytes_per_token * chunk_tokens
        return round(raw / MEASURED_RATIO_VS_BF16["lossless"]), False
    import torch

    from kvaas import codec

    dt = {"float32": torch.float32, "float16": torch.float16}.get(shape.dtype, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(
        (shape.layers, 2, chunk_tokens, shape.kv_heads, shape.head_dim), generator=gen
    ).to(dt)
    return len(codec.encode(kv, scheme)), True
