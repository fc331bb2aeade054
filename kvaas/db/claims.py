"""The ``Idempotency-Key`` a request holds, as seen by the service that handles it.

The API's idempotency middleware sets :data:`CLAIMED_KEY` while the request it claimed a key
for runs; a service that creates an object calls :func:`record_resource` in the transaction
that creates it, so the key names the object as soon as (and only if) the object exists. A
retry after the gateway died between that commit and the stored response then answers with
the object instead of creating a second one.
"""

from __future__ import annotations

from contextvars import ContextVar

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from kvaas.db.models import IdempotencyRecord

#: ``(tenant id, key)`` of the key the running request holds; ``None`` outside such a request.
CLAIMED_KEY: ContextVar[tuple[str, str] | None] = ContextVar("kvaas_claimed_key", default=None)


async def record_resource(session: AsyncSession, tenant_id: str, resource_id: str) -> None:
    """Name ``resource_id`` under the key the current request of ``tenant_id`` holds (in
    ``session``; the caller commits with the object's own insert). Nothing without a key."""
    claim = CLAIMED_KEY.get()
    if claim is None or claim[0] != tenant_id:
        return
    await session.execute(
        update(IdempotencyRecord)
        .where(
            IdempotencyRecord.tenant_id == tenant_id,
            IdempotencyRecord.key == claim[1],
            IdempotencyRecord.state == "in_flight",
        )
        .values(resource_id=resource_id)
    )
