"""MaintenanceLocks on both databases: while one holder (a Database of its own, as another
process has) is inside a step, every other gets False at once; after it leaves, the next
gets True. Steps of other names are independent."""

from __future__ import annotations

from kvtest.services import PgSchema

from kvaas.db.session import Database
from kvaas.services.leader import MaintenanceLocks


async def test_one_holder_per_step(database_url: str) -> None:
    a, b = Database(database_url), Database(database_url)
    try:
        la, lb = MaintenanceLocks(a), MaintenanceLocks(b)
        async with la.exclusive("drain") as mine:
            assert mine
            async with lb.exclusive("drain") as theirs:
                assert not theirs
            async with lb.exclusive("reconcile") as other:
                assert other
        ran: list[str] = []

        async def step() -> None:
            ran.append("b")

        assert await lb.run("drain", step)
        assert ran == ["b"]
    finally:
        await a.dispose()
        await b.dispose()


async def test_schemas_of_one_database_are_independent() -> None:
    """Advisory locks are per database: two deployments in two schemas of one PostgreSQL
    database each run their own maintenance."""
    s1, s2 = PgSchema(), PgSchema()
    a, b = Database(s1.url), Database(s2.url)
    try:
        async with MaintenanceLocks(a).exclusive("drain") as mine:
            assert mine
            async with MaintenanceLocks(b).exclusive("drain") as theirs:
                assert theirs
    finally:
        await a.dispose()
        await b.dispose()
        s1.drop()
        s2.drop()
