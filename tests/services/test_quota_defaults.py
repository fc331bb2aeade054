"""Every tenant has finite storage limits: its own, else the default settings (which an
operator may lift explicitly)."""

from __future__ import annotations

import pytest

from kvaas.config import Settings
from kvaas.db.models import Tenant
from kvaas.services import quotas

EMPTY = quotas.Usage(caches=0, tokens=0, bytes=0)


def _settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def test_defaults_are_finite() -> None:
    d = quotas.Limits.from_settings(_settings())
    assert d.storage_tokens is not None and d.storage_bytes is not None
    assert 0 < d.max_caches <= 10_000


def test_a_tenant_without_quotas_gets_the_defaults() -> None:
    d = quotas.Limits(max_caches=2, storage_tokens=1_000, storage_bytes=10_000)
    t = Tenant(name="t")  # no quota of its own
    quotas.check(t, EMPTY, new_cache=True, tokens=1_000, nbytes=10_000, defaults=d)
    with pytest.raises(quotas.QuotaExceeded) as e:
        quotas.check(t, EMPTY, new_cache=True, tokens=1_001, nbytes=1, defaults=d)
    assert e.value.extra["limit"] == "storage_tokens" and e.value.extra["maximum"] == 1_000
    with pytest.raises(quotas.QuotaExceeded) as e:
        quotas.check(t, EMPTY, new_cache=True, tokens=1, nbytes=10_001, defaults=d)
    assert e.value.extra["limit"] == "storage_bytes"
    with pytest.raises(quotas.CacheLimitExceeded):
        full = quotas.Usage(caches=2, tokens=0, bytes=0)
        quotas.check(t, full, new_cache=True, tokens=1, nbytes=1, defaults=d)


def test_a_tenants_own_quota_overrides_the_default() -> None:
    d = quotas.Limits(max_caches=2, storage_tokens=1_000, storage_bytes=10_000)
    t = Tenant(name="t", storage_quota_tokens=50_000, storage_quota_bytes=500, max_caches=5)
    quotas.check(t, quotas.Usage(4, 0, 0), new_cache=True, tokens=50_000, nbytes=1, defaults=d)
    with pytest.raises(quotas.QuotaExceeded):
        quotas.check(t, EMPTY, new_cache=True, tokens=1, nbytes=501, defaults=d)


def test_operators_lift_a_default_explicitly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVAAS_DEFAULT_STORAGE_QUOTA_TOKENS", "unlimited")
    monkeypatch.setenv("KVAAS_DEFAULT_STORAGE_QUOTA_BYTES", "Unlimited")
    d = quotas.Limits.from_settings(Settings(_env_file=None))
    assert d.storage_tokens is None and d.storage_bytes is None
    t = Tenant(name="t")
    quotas.check(t, EMPTY, new_cache=True, tokens=10**12, nbytes=10**15, defaults=d)
    monkeypatch.setenv("KVAAS_DEFAULT_STORAGE_QUOTA_TOKENS", "12345")
    assert Settings(_env_file=None).default_storage_quota_tokens == 12345
