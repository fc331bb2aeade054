"""MaintenanceLocks on both databases: while one holder (a Database of its own, as another
process has) is inside a step, every other gets False at once; after it leaves, the next
gets True. Steps of other names are independent."""

from __future__ import annotations

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
