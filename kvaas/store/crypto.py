"""Encryption at rest of KV chunks: AES-256-GCM under per-tenant keys.

**What is sealed, where.** Every chunk is sealed once, where it enters the store
(:meth:`TieredStore.put_chunks <kvaas.store.tiered.TieredStore.put_chunks>` with a
:class:`ChunkSealer`), and opened where it leaves it (:meth:`get_prefix
<kvaas.store.tiered.TieredStore.get_prefix>`). Every tier holds the same sealed bytes, the
in-process memory tier included: promotion, demotion and storage class changes copy sealed blobs
as they are, never re-encrypting. Holding plaintext in the memory tier would save only the
opening of a memory hit: about 30 µs of AES-GCM for a 288 KB int4 chunk (roughly 10 GB/s on one
core with AES-NI), about 0.2 ms with the allocation of the opened copy (``bench/store.py``: a
memory-tier ``get_prefix`` runs at ~1.3 GB/s sealed against ~8 GB/s handing out the stored
object itself), against ~36 ms to decode that chunk on a CPU engine: not worth plaintext.

**Keys.** The gateway holds the *master keys* (:class:`MasterKeys`: ``KVAAS_ENCRYPTION_KEY``
under the id ``KVAAS_ENCRYPTION_KEY_ID``, older ones from ``KVAAS_ENCRYPTION_OLD_KEYS``, or a
key generated once as ``<data_dir>/master.key``). A tenant's *data key* for key id ``kid`` is::

    HKDF-SHA256(ikm = master[kid], salt = none,
                info = PURPOSE ‖ u8 len(kid) ‖ kid ‖ namespace)       (32 bytes)

where ``namespace`` is the tenant's 32-byte chunk namespace, itself derived from the tenant's
secret (:func:`~kvaas.store.keys.derive_namespace`). The gateway derives the data keys of every
configured key id and sends them with the request, in the
:class:`~kvaas.connector.params.TransferPlan` (:class:`TenantKeys`); the engine's worker seals and
opens with them. This choice (rather than handing workers the master key and the namespace) keeps
the master key inside the gateway: a ``vllm serve`` node, its command line or its request logs
can expose only the data keys of the tenants it served, and never the namespace (which would let
it compute the tenant's chunk keys). Rotation: new chunks are sealed under the current key id;
chunks sealed under an older id stay readable while its master key is configured.

**Format** (a fixed :data:`OVERHEAD` of 53 bytes around the codec container, which
:func:`kvaas.codec.sizing.chunk_size` counts in a chunk's stored size)::

    offset  size  field
    0       4     magic b"KVE\\x00"
    4       1     format version (1)
    5       16    key id (ASCII, 1-16 of ``A-Za-z0-9._-``, NUL-padded)
    21      4     key check: SHA-256(CHECK_CONTEXT ‖ data key)[:4]
    25      12    nonce (random)
    37      ...   AES-256-GCM ciphertext of the codec container, then its 16-byte tag

The associated data is the header (bytes ``0 .. 37``) ‖ the 32-byte chunk key ‖ u32 len ‖
model fingerprint ‖ u32 len ‖ scheme. A blob altered, or moved under another chunk key (the key
already folds in the fingerprint and scheme; they are bound explicitly too), fails
authentication: :class:`SealError`, which the store counts as a corrupt read and treats as a
miss. A blob sealed under a key this process does not hold (an unknown key id, another key under
the same id, a newer format, another tenant's key) raises :class:`ForeignSeal`: a miss too, but
the blob is left in place, since a gateway configured with other keys (during a rolling
rotation, say) may still read it. Random 96-bit nonces: one data key should seal fewer than 2^32
chunks, far more than a tenant stores.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kvaas.store.errors import ConfigurationError
from kvaas.store.keys import KEY_BYTES, ChunkKey

if TYPE_CHECKING:
    from kvaas.config import Settings
    from kvaas.store.tier import Blob

MAGIC = b"KVE\x00"
VERSION = 1
SECRET_BYTES = 32
"""Length of master keys and data keys (AES-256)."""
KEY_ID_BYTES = 16
CHECK_BYTES = 4
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + 1 + KEY_ID_BYTES + CHECK_BYTES + NONCE_BYTES
OVERHEAD = HEADER_BYTES + TAG_BYTES
"""Bytes sealing adds to a chunk (``kvaas.codec.sizing.SEAL_OVERHEAD_BYTES``, which a test
compares with this)."""
MASTER_KEY_FILE = "master.key"
"""The generated master key's file name under the data directory."""
PURPOSE = b"kvaas 2025-01 chunk data key v1"
CHECK_CONTEXT = b"kvaas 2025-01 chunk data key check v1"
KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,16}$")
_KID_AT = len(MAGIC) + 1
_CHECK_AT = _KID_AT + KEY_ID_BYTES


class SealError(Exception):
    """A sealed chunk cannot be opened: not a sealed chunk, truncated, altered, or stored under
    another chunk key. Never raised out of the store: a read counts it and treats it as a miss."""


class ForeignSeal(SealError):
    """The chunk was sealed under a key this process does not hold (unknown key id, another key
    under the same id, another tenant's key, a newer format): a miss, but left in place."""


def check_key_id(kid: str) -> str:
    """Return ``kid`` if it is a valid key id (1-16 of ``A-Za-z0-9._-``)."""
    if not isinstance(kid, str) or not KEY_ID.match(kid):
        raise ConfigurationError(
            f"an encryption key id is 1-16 letters, digits, '.', '_' or '-', got {kid!r}"
        )
    return kid


def _check_secret(kid: str, secret: bytes) -> bytes:
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        raise ConfigurationError(f"encryption key {kid!r} must be {SECRET_BYTES} bytes")
    return secret


def key_check(data_key: bytes) -> bytes:
    """The header's key check of ``data_key``: tells a blob sealed under another key apart from
    an altered one (4 bytes of a hash: reveals nothing usable about the key)."""
    return hashlib.sha256(CHECK_CONTEXT + data_key).digest()[:CHECK_BYTES]


@dataclass(frozen=True, slots=True)
class TenantKeys:
    """One tenant's data keys by key id, and the id new chunks are sealed under. Plain values
    (picklable): it travels from the gateway to the engine's worker inside a transfer plan."""

    current: str
    keys: Mapping[str, bytes] = field(repr=False)

    def __post_init__(self) -> None:
        check_key_id(self.current)
        for kid, key in self.keys.items():
            _check_secret(check_key_id(kid), key)
        if self.current not in self.keys:
            raise ConfigurationError(f"no data key for the current key id {self.current!r}")

    def to_doc(self) -> dict[str, Any]:
        """The JSON form carried in a plan (keys as hex); :meth:`from_doc` reads it back."""
        return {"key_id": self.current, "keys": {k: v.hex() for k, v in self.keys.items()}}

    @classmethod
    def from_doc(cls, doc: Any) -> TenantKeys:
        """Parse :meth:`to_doc` output; raises ``ValueError`` on anything malformed."""
        if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), Mapping):
            raise ValueError("kvaas.seal must be an object with key_id and keys")
        try:
            keys = {str(k): bytes.fromhex(v) for k, v in doc["keys"].items()}
            return cls(str(doc.get("key_id")), keys)
        except (TypeError, ValueError) as e:  # ConfigurationError is a ValueError
            raise ValueError(f"kvaas.seal is malformed: {e}") from None


class MasterKeys:
    """The gateway's master keys by key id and the current id; derives tenants' data keys."""

    def __init__(self, current: str, keys: Mapping[str, bytes]) -> None:
        for kid, key in keys.items():
            _check_secret(check_key_id(kid), key)
        if check_key_id(current) not in keys:
            raise ConfigurationError(f"no master key for the current key id {current!r}")
        self.current = current
        self._keys = dict(keys)

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> MasterKeys:
        """The keys of ``KVAAS_ENCRYPTION_*``: the current key (generated and kept in
        ``<data_dir>/master.key`` when unset) and the old ones. Raises
        :class:`ConfigurationError`. (The settings hold keys normalised to hex.)"""
        current = settings.encryption_key_id
        key = settings.encryption_key
        if key is None:
            master = load_or_create_key(Path(settings.data_dir) / MASTER_KEY_FILE)
        else:
            master = bytes.fromhex(key.get_secret_value())
        keys = {current: master}
        old = settings.encryption_old_keys
        for item in old.get_secret_value().split(",") if old is not None else []:
            kid, _, hexkey = item.partition(":")
            if kid in keys:
                raise ConfigurationError(
                    f"KVAAS_ENCRYPTION_OLD_KEYS names key id {kid!r} twice or as the current id"
                )
            keys[kid] = bytes.fromhex(hexkey)
        return cls(current, keys)

    def wrapping_key(self, kid: str) -> bytes:
        """The key that wraps secrets kept in the metadata database under key id ``kid``
        (``KeyError`` for an id that is not configured)."""
        return _derive(self._keys[kid], kid, WRAP_PURPOSE)

    def tenant_keys(self, namespace: bytes) -> TenantKeys:
        """The data keys of the tenant whose chunk namespace is ``namespace``."""
        if len(namespace) < 16:
            raise ValueError("namespace must be at least 16 bytes (use derive_namespace)")
        return TenantKeys(
            self.current, {kid: _derive(m, kid, namespace) for kid, m in self._keys.items()}
        )


WRAP_PURPOSE = b"kvaas 2026-11 secret wrapping key v1"
WRAP_PREFIX = "w1"


def is_wrapped(stored: str) -> bool:
    """Whether ``stored`` is a :func:`wrap_secret` value (else: a secret kept in clear)."""
    return stored.startswith(WRAP_PREFIX + ":")


def namespace_secret_context(tenant_id: str) -> str:
    """What a tenant's wrapped namespace secret is bound to: its column and its tenant, so a
    wrapped secret copied to another tenant's row fails to unwrap."""
    return f"tenants.namespace_secret:{tenant_id}"


def wrap_secret(keys: MasterKeys, secret: bytes, context: str) -> str:
    """``secret`` sealed for storage in the metadata database: AES-256-GCM under a key derived
    from the current master key, bound to ``context`` (which column holds it), as
    ``w1:<key id>:<urlsafe base64 of nonce, ciphertext and tag>``."""
    kid = keys.current
    nonce = os.urandom(NONCE_BYTES)
    ct = AESGCM(keys.wrapping_key(kid)).encrypt(nonce, secret, context.encode())
    return f"{WRAP_PREFIX}:{kid}:{base64.urlsafe_b64encode(nonce + ct).decode()}"


def unwrap_secret(keys: MasterKeys, stored: str, context: str) -> bytes:
    """The secret of a :func:`wrap_secret` value; ``SealError`` when it is not one, names a key
    id this process does not hold, or was altered or moved to another ``context``."""
    prefix, _, rest = stored.partition(":")
    kid, _, body = rest.partition(":")
    if prefix != WRAP_PREFIX or not body:
        raise SealError("not a wrapped secret")
    try:
        raw = base64.urlsafe_b64decode(body.encode())
        key = keys.wrapping_key(kid)
        return AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode())
    except KeyError:
        raise ForeignSeal(f"wrapped under key id {kid!r}, which is not configured") from None
    except (ValueError, InvalidTag):
        raise SealError("the wrapped secret was altered or belongs elsewhere") from None


def _derive(master: bytes, kid: str, namespace: bytes) -> bytes:
    info = PURPOSE + bytes([len(kid)]) + kid.encode() + namespace
    return HKDF(algorithm=SHA256(), length=SECRET_BYTES, salt=None, info=info).derive(master)


def load_or_create_key(path: Path) -> bytes:
    """The master key kept in ``path`` (64 hex digits), created on first use: random, mode
    0600, written to a temporary file and linked into place, so concurrent starters agree on
    one key (the first link wins) and a reader never sees a partial file."""
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, secrets.token_bytes(SECRET_BYTES).hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):  # another process was first: use its key
            os.link(tmp, path)
    except OSError as e:
        raise ConfigurationError(f"cannot create the master key file {path}: {e}") from e
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != SECRET_BYTES:
        raise ConfigurationError(f"{path} does not hold a {SECRET_BYTES}-byte key in hex")
    return key


def _field(value: bytes) -> bytes:
    return struct.pack("<I", len(value)) + value


def _check_header(blob: memoryview) -> None:
    """Raise :class:`SealError` unless ``blob`` is structurally a sealed chunk of this format."""
    if len(blob) < len(MAGIC) + 1 or blob[: len(MAGIC)] != MAGIC:
        raise SealError("not a sealed chunk")
    if blob[len(MAGIC)] != VERSION:
        raise ForeignSeal(f"sealed chunk format version {blob[len(MAGIC)]} is not supported here")
    if len(blob) < OVERHEAD:
        raise SealError("sealed chunk is truncated")


def check_envelope(blob: Blob) -> None:
    """Check that ``blob`` is structurally a sealed chunk (no key needed: authentication is
    checked on open). Raises :class:`SealError`."""
    _check_header(memoryview(blob).cast("B"))


class ChunkSealer:
    """Seals and opens one tenant's chunks of one model fingerprint and codec scheme (what a
    transfer plan or manifest names). Built where the chunks are handled (the engine's worker)."""

    def __init__(self, keys: TenantKeys, fingerprint: str, scheme: str) -> None:
        self.keys = keys
        self._context = _field(fingerprint.encode()) + _field(scheme.encode())
        self._aead = {kid: AESGCM(k) for kid, k in keys.keys.items()}
        self._checks = {kid: key_check(k) for kid, k in keys.keys.items()}

    def _aad(self, header: bytes | memoryview, key: ChunkKey) -> bytes:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a chunk key has {KEY_BYTES} bytes, got {len(key)}")
        return bytes(header) + key + self._context

    def seal(self, key: ChunkKey, blob: Blob) -> bytes:
        """``blob`` (a codec container) sealed under the current key, bound to ``key``."""
        kid = self.keys.current
        nonce = secrets.token_bytes(NONCE_BYTES)
        header = (
            MAGIC
            + bytes([VERSION])
            + kid.encode().ljust(KEY_ID_BYTES, b"\0")
            + self._checks[kid]
            + nonce
        )
        return header + self._aead[kid].encrypt(nonce, blob, self._aad(header, key))

    def open(self, key: ChunkKey, blob: Blob) -> bytes:
        """The codec container sealed in ``blob`` under ``key``. Raises :class:`ForeignSeal`
        for a key this sealer does not hold, :class:`SealError` for anything else wrong."""
        mv = memoryview(blob).cast("B")
        _check_header(mv)
        kid = bytes(mv[_KID_AT:_CHECK_AT]).rstrip(b"\0").decode("ascii", errors="replace")
        aead = self._aead.get(kid)
        if aead is None or mv[_CHECK_AT : _CHECK_AT + CHECK_BYTES] != self._checks[kid]:
            raise ForeignSeal(f"chunk sealed under a key not held here (key id {kid!r})")
        nonce = mv[HEADER_BYTES - NONCE_BYTES : HEADER_BYTES]
        aad = self._aad(mv[:HEADER_BYTES], key)
        try:
            return aead.decrypt(nonce, mv[HEADER_BYTES:], aad)
        except InvalidTag:
            raise SealError("authentication failed: altered, or stored under another key") from None
