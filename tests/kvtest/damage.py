"""Damaging a stored blob for tests: always a change (flipping every bit of a byte), never a
write that may leave the byte as it was (a random ciphertext byte is already ``0xff`` once in
256 times)."""

from __future__ import annotations

from kvaas.store.keys import ChunkKey
from kvaas.store.redis_tier import RedisTier


async def flip_redis_bytes(tier: RedisTier, key: ChunkKey, offset: int, n: int = 1) -> None:
    """Invert ``n`` bytes of ``key``'s blob in the Redis ``tier`` from ``offset`` on."""
    name = tier.keys.chunk(key)
    old = await tier.conn.run(lambda c: c.getrange(name, offset, offset + n - 1))
    assert len(old) == n, f"the blob is shorter than {offset + n} bytes"
    await tier.conn.run(lambda c: c.setrange(name, offset, bytes(b ^ 0xFF for b in old)))
