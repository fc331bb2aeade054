"""Typed errors of the KV store.

Store errors derive from :class:`kvaas.errors.APIError` (a plain exception module with no web
framework imports), so the gateway can return them; the store itself never imports the web
stack. Their messages name internals (Redis addresses, file paths, driver errors): they are
not ``public``, so a caller reads the class's ``description`` and the message goes to the
log. A *miss* is never an error: lookups return ``None`` / ``False`` for absent or corrupt
chunks.
"""

from __future__ import annotations

from kvaas.errors import APIError, PayloadTooLarge, ServiceUnavailable


class StoreError(APIError):
    """Base class of every error the store raises."""

    status_code = 500
    type = "store_error"
    description = "The KV store failed."
    public = False


class ConfigurationError(StoreError, ValueError):
    """The store was configured with impossible settings (e.g. a budget below one chunk)."""

    type = "store_configuration_error"
    description = "The KV store configuration is invalid."


class TierUnavailable(StoreError, ServiceUnavailable):
    """A tier (typically Redis) is unreachable or its circuit breaker is open.

    Raised quickly (socket timeouts on every call, no retry loops) for operations that need the
    tier; reads skip an unavailable tier instead of raising.
    """

    status_code = 503
    type = "tier_unavailable"
    description = "A storage tier is unavailable; retry later."

    def __init__(self, tier: str, message: str | None = None) -> None:
        self.tier = tier
        super().__init__(message or f"storage tier {tier!r} is unavailable")


class StorageFull(StoreError):
    """A tier has no room for a write (byte budget reached, ENOSPC/EFBIG, Redis OOM)."""

    status_code = 507
    type = "insufficient_storage"
    description = (
        "The KV store is full: nothing was stored. Delete caches you no longer need or retry "
        "later, once expired caches have been collected."
    )

    def __init__(self, tier: str, message: str | None = None) -> None:
        self.tier = tier
        super().__init__(message or f"storage tier {tier!r} is full")


class BlobTooLarge(StoreError, PayloadTooLarge):
    """A blob is larger than a tier's whole byte budget: it can never be stored there."""

    status_code = 413
    type = "blob_too_large"
    description = "The chunk is larger than the tier's byte budget."


class ManifestConflict(StoreError):
    """A different manifest is already stored under the same cache id and version."""

    status_code = 409
    type = "manifest_conflict"
    description = "A different manifest already exists for this cache version."


class ManifestNotFound(StoreError):
    """No manifest is stored under the given cache id and version."""

    status_code = 404
    type = "manifest_not_found"
    description = "No manifest for this cache version."
