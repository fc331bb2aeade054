"""Tenants' namespace secrets are stored wrapped under the master key: a copy of the database
does not reveal them, a wrapped secret copied to another tenant's row does not unwrap, and a
rotated master key still reads secrets wrapped under the old one."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import select, update

from kvaas.auth.tenancy import namespace_secret
from kvaas.db.models import Tenant
from kvaas.errors import ServiceUnavailable
from kvaas.store.crypto import (
    ForeignSeal,
    MasterKeys,
    SealError,
    namespace_secret_context,
    unwrap_secret,
    wrap_secret,
)

K1, K2 = os.urandom(32), os.urandom(32)


def test_wrap_binds_the_secret_to_its_tenant_and_key() -> None:
    keys = MasterKeys("k1", {"k1": K1})
    secret = os.urandom(32)
    stored = wrap_secret(keys, secret, namespace_secret_context("ten_a"))
    assert stored.startswith("w1:k1:") and secret.hex() not in stored and len(stored) <= 160
    assert unwrap_secret(keys, stored, namespace_secret_context("ten_a")) == secret
    with pytest.raises(SealError):
        unwrap_secret(keys, stored, namespace_secret_context("ten_b"))  # moved to another row
    with pytest.raises(SealError):
        unwrap_secret(MasterKeys("k1", {"k1": K2}), stored, namespace_secret_context("ten_a"))
    with pytest.raises(ForeignSeal):
        unwrap_secret(MasterKeys("k2", {"k2": K2}), stored, namespace_secret_context("ten_a"))
    rotated = MasterKeys("k2", {"k2": K2, "k1": K1})
    assert unwrap_secret(rotated, stored, namespace_secret_context("ten_a")) == secret
    again = wrap_secret(rotated, secret, namespace_secret_context("ten_a"))
    assert again.startswith("w1:k2:") and again != stored


async def test_tenants_created_by_the_api_keep_wrapped_secrets(make_app) -> None:  # type: ignore[no-untyped-def]
    async with make_app() as api:
        service = api.app.state.cache_service
        async with api.app.state.db.session() as s:
            rows = {t.name: t for t in (await s.execute(select(Tenant))).scalars()}
        acme, globex = rows["acme"], rows["globex"]
        assert acme.namespace_secret.startswith("w1:") and globex.namespace_secret.startswith("w1:")
        secret = namespace_secret(acme, service.master_keys)
        assert len(secret) == 32 and secret.hex() not in acme.namespace_secret
        assert service._namespace(acme) != service._namespace(globex)

        # globex's row given acme's wrapped secret: it does not unwrap there
        async with api.app.state.db.session() as s:
            await s.execute(
                update(Tenant)
                .where(Tenant.id == globex.id)
                .values(namespace_secret=acme.namespace_secret)
            )
            await s.commit()
            moved = await s.get(Tenant, globex.id)
            assert moved is not None
        with pytest.raises(ServiceUnavailable) as e:
            service._namespace(moved)
        assert e.value.detail is not None and globex.id in e.value.detail
        assert acme.namespace_secret not in e.value.public_message


def test_a_secret_stored_before_wrapping_is_read_as_it_is() -> None:
    legacy = Tenant(id="ten_legacy", name="legacy", namespace_secret=os.urandom(32).hex())
    keys = MasterKeys("k1", {"k1": K1})
    assert namespace_secret(legacy, keys) == bytes.fromhex(legacy.namespace_secret)
