"""Budget amounts are parsed with a bounded format: no input builds a huge number, and none
is a 5xx, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import pytest

from kvaas.billing.money import MAX_MINOR, parse_minor
from kvaas.errors import BadRequest

HOSTILE = [
    "1e300000",
    "1e999999999",
    "9" * 10_000,
    "1" * 13,
    "-1",
    "NaN",
    "Infinity",
    "1.001",
    "١٢",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_amount_strings_are_refused(text: str) -> None:
    with pytest.raises(BadRequest) as e:
        parse_minor(text, 2)
    assert e.value.param == "amount"


def test_largest_amount_fits_the_database() -> None:
    assert parse_minor("9" * 12 + ".99", 2) == 10**14 - 1 < MAX_MINOR < 2**63


async def test_budget_api_refuses_hostile_amounts(make_keyed_tenant, make_app) -> None:  # type: ignore[no-untyped-def]
    _tenant, key = await make_keyed_tenant("hostile")
    auth = {"Authorization": f"Bearer {key}"}
    async with make_app() as (_app, client):
        for text in ["1e300000", "1e999999999", "1" * 30]:
            r = await client.put(
                "/v1/budget", json={"amount": text, "currency": "USD"}, headers=auth
            )
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "amount"
        for minor in [2**63, 10**30, MAX_MINOR + 1]:
            r = await client.put(
                "/v1/budget", json={"amount_minor": minor, "currency": "USD"}, headers=auth
            )
            assert r.status_code == 422, r.text
        # a JSON integer with more digits than Python parses by default is a client error
        body = b'{"amount_minor": ' + b"9" * 5000 + b', "currency": "USD"}'
        r = await client.put(
            "/v1/budget", content=body, headers={**auth, "Content-Type": "application/json"}
        )
        assert r.status_code in (400, 422), r.text
        r = await client.put(
            "/v1/budget", json={"amount": "250.00", "currency": "USD"}, headers=auth
        )
        assert r.status_code == 200 and r.json()["amount_minor"] == 25000
