"""Typed errors of the codec. Decoding never raises anything else."""

from __future__ import annotations


class CodecError(Exception):
    """Base class: the blob cannot be decoded (or the input cannot be encoded)."""


class CorruptBlobError(CodecError):
    """Bad magic, checksum mismatch, truncated or inconsistent lengths."""


class UnsupportedVersionError(CodecError):
    """The container format version is newer (or older) than this reader supports."""


class UnknownSchemeError(CodecError):
    """The scheme id or name is not registered."""


class InvalidInputError(CodecError):
    """The tensor given to ``encode`` does not have the canonical layout or dtype."""
