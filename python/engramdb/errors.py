"""Exceptions raised by engramdb.

Every error derives from :class:`EngramError`. Errors about bad input also
derive from the built-in a caller would expect: ``ValueError`` for a wrong
dimension, NaN values or an empty batch, ``KeyError`` for an unknown id. The
native extension raises these exact classes (see ``rust/py/src/error.rs``).
"""

from __future__ import annotations


class EngramError(Exception):
    """Base class of every engramdb error."""


class DimensionMismatchError(EngramError, ValueError):
    """A vector's length differs from the store's dimension."""


class InvalidVectorError(EngramError, ValueError):
    """A vector holds NaN or infinite values (or is zero under cosine)."""


class EmptyInputError(EngramError, ValueError):
    """An empty batch or empty text where something is required."""


class InvalidArgumentError(EngramError, ValueError):
    """Any other unusable argument: unknown metric, k < 1, malformed filter..."""


class DuplicateIdError(EngramError, ValueError):
    """``add`` with an id that already exists (use ``upsert`` to replace)."""


class NotFoundError(EngramError, KeyError):
    """An id that is not in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StoreLockedError(EngramError):
    """Another writer holds the store's lock. Open with ``read_only=True`` to read."""


class ReadOnlyError(EngramError):
    """A write through a store opened read-only."""


class StoreClosedError(EngramError):
    """An operation on a closed store."""


class CorruptionError(EngramError):
    """A file failed its checksum or structural checks; the message names it."""


class FormatVersionError(EngramError):
    """A file was written by a newer, incompatible engramdb format version."""


class StorageIOError(EngramError, OSError):
    """The operating system refused a read or write (disk full, permissions...)."""


__all__ = [
    "EngramError",
    "DimensionMismatchError",
    "InvalidVectorError",
    "EmptyInputError",
    "InvalidArgumentError",
    "DuplicateIdError",
    "NotFoundError",
    "StoreLockedError",
    "ReadOnlyError",
    "StoreClosedError",
    "CorruptionError",
    "FormatVersionError",
    "StorageIOError",
]
