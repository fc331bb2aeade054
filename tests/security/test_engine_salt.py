"""The engine's prefix-cache salt is 32 bytes derived from the tenant's namespace, not the
4-byte slot prefix: two tenants whose slot prefixes collide still never share (or time) the
engine's own cached KV."""

from __future__ import annotations

import os

from kvaas.config import Settings
from kvaas.db.models import Tenant
from kvaas.engine import Sampling
from kvaas.services.caches import CacheService
from kvaas.store.keys import derive_namespace, namespace_slot


def _colliding_secrets() -> tuple[bytes, bytes]:
    """Two tenant secrets whose namespaces share a slot prefix (a birthday search over 2^32:
    about 2^16 draws)."""
    seen: dict[str, bytes] = {}
    while True:
        secret = os.urandom(32)
        slot = namespace_slot(derive_namespace(secret))
        if slot in seen and seen[slot] != secret:
            return seen[slot], secret
        seen[slot] = secret


def test_tenants_with_colliding_slot_prefixes_get_distinct_salts() -> None:
    a, b = _colliding_secrets()
    service = CacheService(Settings(_env_file=None), None, None, None)  # type: ignore[arg-type]
    salts = [
        service.salted(Tenant(id=f"ten_{i}", name=f"t{i}", namespace_secret=s.hex()), Sampling())
        for i, s in enumerate((a, b))
    ]
    sa, sb = (s.cache_salt for s in salts)
    assert sa is not None and sb is not None
    assert len(bytes.fromhex(sa)) == 32 and len(bytes.fromhex(sb)) == 32
    assert sa != sb
    # and the salt is not derived from the (public) slot prefix
    assert namespace_slot(derive_namespace(a)) not in sa
