"""``Idempotency-Key``: a POST retried with the same key runs once.

Contract, for every authenticated ``POST`` that carries an ``Idempotency-Key`` header:

- the first request with a key runs and its response (status, body and the headers that
  describe it) is stored for ``KVAAS_IDEMPOTENCY_TTL_SECONDS`` (24 h by default);
- a later request from the same tenant with the same key and the same request (method, path,
  query and body bytes, compared by sha256) gets the stored response again, with the header
  ``Idempotent-Replayed: true``, and nothing runs a second time;
- the same key with a different request is ``409 idempotency_conflict``
  (``reason: "request_mismatch"``), and so is a request whose key is still held by a request
  in flight (``reason: "in_flight"``, with ``Retry-After``);
- a key longer than ``KVAAS_IDEMPOTENCY_KEY_MAX_LENGTH`` or with characters outside printable
  ASCII is ``400``.

Responses that say "try again" are not stored, so a retry runs anew: 5xx, 429, and a request
that failed or was cut off before its response was complete. A key held by a request that
died with its process is taken over after ``KVAAS_IDEMPOTENCY_IN_FLIGHT_LEASE_SECONDS``
(15 minutes by default). Requests whose API key does not authenticate pass straight to the
application (which answers 401/403) and store nothing.

A create names the cache it made under its key in the transaction that makes it
(:mod:`kvaas.db.claims`): if the gateway dies before the response is stored, the retry that
takes the key over answers with that cache (``201`` when it is ready, else ``202``, with
``Idempotent-Replayed: true``) instead of creating a second one, and that answer is stored.

Stored responses are capped at ``KVAAS_IDEMPOTENCY_MAX_STORED_BYTES`` (256 KiB by default). A
larger response (a long completion of an attach) is passed through whole but its body is not
kept: a retry gets ``409 idempotency_conflict`` with ``reason: "response_not_stored"`` and the
original status, and the request does not run a second time. Expired records are deleted in
batches (:func:`sweep_idempotency`).
The middleware resolves the API key once (:mod:`kvaas.auth.resolver`) and leaves the result in
the request's scope, where the application's ``authenticate`` takes it instead of resolving again.

Records live in the metadata database (table ``idempotency_keys``), so every gateway worker
sees them, on SQLite and PostgreSQL alike. :class:`IdempotencyMiddleware` is plain ASGI: it
covers every POST route, streaming ones included (the stream is passed through as it comes and
stored whole when it ends).
"""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, exc, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvaas.api.asgi import error_response_messages, header
from kvaas.api.schemas.caches import CacheObject
from kvaas.auth.cache import resolve_cached
from kvaas.auth.resolver import AuthContext, Resolution, bearer_credential, stash
from kvaas.db.base import utcnow
from kvaas.db.claims import CLAIMED_KEY
from kvaas.db.models import Cache, IdempotencyRecord
from kvaas.db.session import Database, DatabaseUnavailable
from kvaas.errors import APIError, Conflict, ServiceUnavailable, ValidationFailed

log = logging.getLogger("kvaas.idempotency")

HEADER = b"idempotency-key"
REPLAYED_HEADER = b"idempotent-replayed"
#: A key held ``in_flight`` longer than this is taken to belong to a request that died
#: (the default of ``KVAAS_IDEMPOTENCY_IN_FLIGHT_LEASE_SECONDS``).
IN_FLIGHT_LEASE = timedelta(minutes=15)
#: Bodies above this size are passed through but not kept (``KVAAS_IDEMPOTENCY_MAX_STORED_BYTES``).
MAX_STORED_BYTES = 256 * 1024
#: Expired records deleted per statement by :func:`sweep_idempotency`, and most statements.
SWEEP_BATCH = 500
SWEEP_MAX_BATCHES = 20
#: Response headers never stored (hop-by-hop, per-request or recomputed on replay).
_UNSTORED_HEADERS = frozenset(
    {
        b"content-length",
        b"date",
        b"server",
        b"connection",
        b"transfer-encoding",
        b"set-cookie",
        b"x-request-id",
        b"x-ratelimit-limit",
        b"x-ratelimit-remaining",
        b"retry-after",
    }
)
_SWEEP_EVERY_S = 300.0


class IdempotencyConflict(Conflict):
    type = "idempotency_conflict"
    description = (
        "The Idempotency-Key was used with a different request, or its first request is still "
        "running."
    )


def _valid_key(key: str, max_length: int) -> bool:
    return 0 < len(key) <= max_length and all(32 <= ord(c) < 127 for c in key)


def request_hash(scope: Scope, body: bytes) -> str:
    """sha256 over method, path, query string and body bytes."""
    h = hashlib.sha256()
    h.update(scope["method"].encode())
    h.update(b"\0" + scope.get("path", "").encode())
    h.update(b"\0" + scope.get("query_string", b""))
    h.update(b"\0" + body)
    return h.hexdigest()


async def _resolve(db: Database, scope: Scope) -> Resolution:
    """The caller of the request, resolved once: kept in the scope for ``authenticate``."""
    credential = bearer_credential(header(scope, b"authorization"))
    resolution = await resolve_cached(scope["app"].state, credential, db)
    stash(scope, resolution)
    return resolution


class IdempotencyMiddleware:
    """Stores and replays responses of POST requests carrying ``Idempotency-Key``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        ttl_seconds: int,
        max_key_length: int,
        in_flight_lease_seconds: int = int(IN_FLIGHT_LEASE.total_seconds()),
        max_stored_bytes: int = MAX_STORED_BYTES,
    ) -> None:
        self.app = app
        self.ttl = timedelta(seconds=ttl_seconds)
        self.max_key_length = max_key_length
        self.lease = timedelta(seconds=in_flight_lease_seconds)
        self.max_stored_bytes = max_stored_bytes
        self._last_sweep = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        key = header(scope, HEADER)
        if key is None:
            await self.app(scope, receive, send)
            return
        if not _valid_key(key, self.max_key_length):
            err = ValidationFailed(
                f"Idempotency-Key must be 1 to {self.max_key_length} printable ASCII characters",
                param="Idempotency-Key",
            )
            await _answer(scope, send, error_response_messages(scope, err))
            return
        db: Database | None = getattr(scope["app"].state, "db", None)
        if db is None:
            await self.app(scope, receive, send)
            return
        try:
            resolution = await _resolve(db, scope)
        except DatabaseUnavailable:  # the app answers 503 itself
            await self.app(scope, receive, send)
            return
        if not isinstance(resolution, AuthContext):  # the app answers 401/403; nothing stored
            await self.app(scope, receive, send)
            return
        tenant_id = resolution.tenant.id

        body = await _read_body(receive)
        digest = request_hash(scope, body)
        await self._maybe_sweep(db)
        try:
            claimed, record = await self._claim(db, tenant_id, key, digest, scope)
        except APIError as e:
            await _answer(scope, send, error_response_messages(scope, e))
            return
        except DatabaseUnavailable:
            down = ServiceUnavailable(
                "the metadata database is unavailable; retry later", headers={"Retry-After": "5"}
            )
            await _answer(scope, send, error_response_messages(scope, down))
            return
        if not claimed:
            assert record is not None
            await _answer(scope, send, self._answer_existing(scope, record, digest))
            return
        if record is not None and record.resource_id is not None:  # its gateway died
            recovered = await self._recover(db, tenant_id, key, record.resource_id)
            if recovered is not None:
                await _answer(scope, send, recovered)
                return
        token = CLAIMED_KEY.set((tenant_id, key))
        try:
            await self._run(db, tenant_id, key, scope, body, receive, send)
        finally:
            CLAIMED_KEY.reset(token)

    # -- claiming a key --------------------------------------------------------------------
    async def _claim(
        self, db: Database, tenant_id: str, key: str, digest: str, scope: Scope
    ) -> tuple[bool, IdempotencyRecord | None]:
        """Take the key for this request (``True``), or return the record holding it. A key
        taken over from a request that died comes back as ``(True, the old record)``."""
        now = utcnow()
        values: dict[str, Any] = {
            "request_hash": digest,
            "method": scope["method"],
            "path": scope.get("path", ""),
            "state": "in_flight",
            "response_status": None,
            "response_headers": None,
            "response_body": None,
            "response_size": None,
            "created_at": now,
            "completed_at": None,
            "expires_at": now + self.ttl,
        }
        async with db.session() as session:
            if await _insert(session, tenant_id, key, values):
                return True, None
            # Taken: reclaim it if it expired or its holder died, atomically.
            before = await session.get(IdempotencyRecord, (tenant_id, key))
            dead = (
                before is not None
                and before.state == "in_flight"
                and before.resource_id is not None
                and before.request_hash == digest
            )
            taken_over = await session.execute(
                update(IdempotencyRecord)
                .where(
                    IdempotencyRecord.tenant_id == tenant_id,
                    IdempotencyRecord.key == key,
                    or_(
                        IdempotencyRecord.expires_at <= now,
                        (IdempotencyRecord.state == "in_flight")
                        & (IdempotencyRecord.created_at <= now - self.lease)
                        & (IdempotencyRecord.request_hash == digest),
                    ),
                )
                .values(**values)
            )
            await session.commit()
            if taken_over.rowcount == 1:  # type: ignore[attr-defined]
                if dead and before is not None and before.expires_at > now:
                    return True, before  # it may have made its object: the caller looks
                return True, None
            record = await session.get(IdempotencyRecord, (tenant_id, key))
            if record is None:  # released between our insert and our look: try once more
                if await _insert(session, tenant_id, key, values):
                    return True, None
                record = await session.get(IdempotencyRecord, (tenant_id, key))
            if record is None:
                raise IdempotencyConflict(
                    "the Idempotency-Key is being used concurrently; retry",
                    extra={"reason": "in_flight"},
                )
            return False, record

    def _answer_existing(
        self, scope: Scope, record: IdempotencyRecord, digest: str
    ) -> list[Message]:
        if record.request_hash != digest:
            err = IdempotencyConflict(
                "this Idempotency-Key was already used with a different request "
                f"({record.method} {record.path} or another body); use a new key",
                param="Idempotency-Key",
                extra={"reason": "request_mismatch"},
            )
            return error_response_messages(scope, err)
        if record.state == "completed" and record.response_body is None and record.response_size:
            err = IdempotencyConflict(
                "the request with this Idempotency-Key completed (status "
                f"{record.response_status}), but its response ({record.response_size} bytes) "
                "was too large to keep for replays; it is not run again",
                param="Idempotency-Key",
                extra={"reason": "response_not_stored", "status": record.response_status},
            )
            return error_response_messages(scope, err)
        if record.state != "completed" or record.response_status is None:
            err = IdempotencyConflict(
                "a request with this Idempotency-Key is still in progress; retry after it ends",
                param="Idempotency-Key",
                headers={"Retry-After": "1"},
                extra={"reason": "in_flight"},
            )
            return error_response_messages(scope, err)
        body = record.response_body or b""
        headers = [
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in record.response_headers or []
        ]
        headers += [
            (b"content-length", str(len(body)).encode()),
            (REPLAYED_HEADER, b"true"),
        ]
        return [
            {"type": "http.response.start", "status": record.response_status, "headers": headers},
            {"type": "http.response.body", "body": body},
        ]

    # -- running the request and storing its response --------------------------------------
    async def _run(
        self,
        db: Database,
        tenant_id: str,
        key: str,
        scope: Scope,
        body: bytes,
        receive: Receive,
        send: Send,
    ) -> None:
        sent_body = False

        async def replay_receive() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # blocks until the client disconnects

        status: int | None = None
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        size = 0
        settled = False  # the record was stored or released

        async def recording_send(message: Message) -> None:
            nonlocal status, headers, size, settled
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
            elif message["type"] == "http.response.body" and not settled:
                chunk = message.get("body", b"")
                size += len(chunk)
                if size <= self.max_stored_bytes:
                    chunks.append(chunk)
                else:
                    chunks.clear()
                if not message.get("more_body", False):
                    # Settle the key before the client sees the end of the response, so an
                    # immediate retry finds the stored answer (or a free key), never "in flight".
                    settled = True
                    if status is not None and _storable(status):
                        kept = b"".join(chunks) if size <= self.max_stored_bytes else None
                        await self._store(db, tenant_id, key, status, headers, kept, size)
                    else:
                        await self._release(db, tenant_id, key)
            await send(message)

        try:
            await self.app(scope, replay_receive, recording_send)
        finally:
            if not settled:
                await self._release(db, tenant_id, key)

    async def _store(
        self,
        db: Database,
        tenant_id: str,
        key: str,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        size: int,
    ) -> None:
        """Complete the key with the response (``body`` ``None``: too large to keep; a retry
        is told so). Only a record still ``in_flight`` is completed."""
        kept = [
            [k.decode("latin-1").lower(), v.decode("latin-1")]
            for k, v in headers
            if k.lower() not in _UNSTORED_HEADERS
        ]
        async with db.session() as session:
            await session.execute(
                update(IdempotencyRecord)
                .where(
                    IdempotencyRecord.tenant_id == tenant_id,
                    IdempotencyRecord.key == key,
                    IdempotencyRecord.state == "in_flight",
                )
                .values(
                    state="completed",
                    response_status=status,
                    response_headers=kept,
                    response_body=body,
                    response_size=size,
                    completed_at=utcnow(),
                )
            )
            await session.commit()

    async def _release(self, db: Database, tenant_id: str, key: str) -> None:
        try:
            async with db.session() as session:
                await session.execute(
                    delete(IdempotencyRecord).where(
                        IdempotencyRecord.tenant_id == tenant_id,
                        IdempotencyRecord.key == key,
                        IdempotencyRecord.state == "in_flight",
                    )
                )
                await session.commit()
        except Exception as e:  # the lease frees the key later
            log.warning("could not release Idempotency-Key: %s", e)

    async def _recover(
        self, db: Database, tenant_id: str, key: str, cache_id: str
    ) -> list[Message] | None:
        """The answer of a create whose gateway died after it made ``cache_id`` (recorded
        under the key in the create's own transaction): the cache as it is now, stored as the
        key's response. ``None`` when the cache is not the tenant's (the request runs)."""
        async with db.session() as session:
            cache = await session.get(Cache, cache_id)
            if cache is None or cache.tenant_id != tenant_id:
                return None
            status = 201 if cache.status == "ready" else 202
            body = CacheObject.of(cache).model_dump_json().encode()
        headers = [(b"content-type", b"application/json")]
        await self._store(db, tenant_id, key, status, headers, body, len(body))
        log.info("Idempotency-Key of a create whose gateway died answered with %s", cache_id)
        return [
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    *headers,
                    (b"content-length", str(len(body)).encode()),
                    (REPLAYED_HEADER, b"true"),
                ],
            },
            {"type": "http.response.body", "body": body},
        ]

    async def _maybe_sweep(self, db: Database) -> None:
        """Delete expired records now and then (at most every five minutes per process)."""
        now = time.monotonic()
        if now - self._last_sweep < _SWEEP_EVERY_S:
            return
        self._last_sweep = now
        try:
            await sweep_idempotency(db)
        except Exception as e:  # sweeping is housekeeping only
            log.warning("idempotency sweep failed: %s", e)


async def sweep_idempotency(
    db: Database, *, batch: int = SWEEP_BATCH, max_batches: int = SWEEP_MAX_BATCHES
) -> int:
    """Delete expired records, ``batch`` per short transaction, at most ``max_batches``
    transactions per call (the rest wait for the next call); return how many were deleted."""
    deleted = 0
    for _ in range(max_batches):
        async with db.session() as session:
            keys = (
                await session.execute(
                    select(IdempotencyRecord.tenant_id, IdempotencyRecord.key)
                    .where(IdempotencyRecord.expires_at <= utcnow())
                    .limit(batch)
                )
            ).all()
            if not keys:
                return deleted
            await session.execute(
                delete(IdempotencyRecord).where(
                    tuple_(IdempotencyRecord.tenant_id, IdempotencyRecord.key).in_(
                        [tuple(k) for k in keys]
                    ),
                    IdempotencyRecord.expires_at <= utcnow(),
                )
            )
            await session.commit()
        deleted += len(keys)
        if len(keys) < batch:
            return deleted
    return deleted


async def _insert(session: AsyncSession, tenant_id: str, key: str, values: dict[str, Any]) -> bool:
    """Add the key's record with ``values``: ``False`` (rolled back) when a record holds the
    key already."""
    session.add(IdempotencyRecord(tenant_id=tenant_id, key=key, **values))
    try:
        await session.commit()
    except exc.IntegrityError:
        await session.rollback()
        return False
    return True


def _storable(status: int) -> bool:
    """Responses a retry should see again; "try again" answers are not stored."""
    return status < 500 and status != 429


async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.request":
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(parts)
        elif message["type"] == "http.disconnect":
            return b"".join(parts)


async def _answer(scope: Scope, send: Send, messages: list[Message]) -> None:
    for message in messages:
        await send(message)
