"""API key format, generation and verification.

A key looks like ``kvs_<prefix>_<secret>``: ``prefix`` is 10 lowercase alphanumerics (stored,
shown in listings, used to find the row), ``secret`` is 40 base62 characters (~238 bits). Only
``sha256(secret)`` is stored; verification compares hashes in constant time. Because secrets are
long and random, a fast hash is safe here (no dictionary to attack).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass

KEY_PREFIX = "kvs"
_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits
PREFIX_LEN = 10
SECRET_LEN = 40
_KEY_RE = re.compile(rf"^{KEY_PREFIX}_([a-z0-9]{{{PREFIX_LEN}}})_([A-Za-z0-9]{{{SECRET_LEN}}})$")


@dataclass(frozen=True, slots=True)
class NewKey:
    """A freshly generated key: ``plaintext`` is shown once and never stored."""

    prefix: str
    secret_hash: str
    plaintext: str


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def generate_key() -> NewKey:
    prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(PREFIX_LEN))
    secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(SECRET_LEN))
    return NewKey(prefix, hash_secret(secret), f"{KEY_PREFIX}_{prefix}_{secret}")


def parse_key(plaintext: str) -> tuple[str, str] | None:
    """``(prefix, secret)`` of a well-formed key, else ``None``."""
    m = _KEY_RE.match(plaintext)
    return (m.group(1), m.group(2)) if m else None


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def display_prefix(prefix: str) -> str:
    """How a key is shown in listings: ``kvs_<prefix>_…``."""
    return f"{KEY_PREFIX}_{prefix}_…"
