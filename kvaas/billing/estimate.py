"""What a cache would cost, and after how many attaches it pays off (pure functions).

Without a cache, each of ``n`` requests prefills the whole prefix: ``n * tokens * prefill``.
With one: the create prefills it once, storage is paid for the TTL, and each attach reads the
stored part (every chunk, the partial last one included) at the cached-read price and
prefills the rest. Break-even is the smallest ``n`` where the cache costs no more. Free tiers
and minimum charges are left out: these are marginal prices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

from kvaas.billing.pricebook import SECONDS_PER_HOUR, TOKENS_PER_MTOK, PriceVersion


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
    on attach (every stored chunk, its partial last one included), the rest prefilled."""
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
