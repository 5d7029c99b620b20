"""Errors the store raises for callers to map to their own responses."""


class StoreError(Exception):
    """Base class for store errors that carry a client-facing message."""

    code = "store_error"


class NotFound(StoreError):
    """The requested row does not exist."""

    code = "not_found"


class Conflict(StoreError):
    """The change collides with existing data (a taken device ident, a closed incident)."""

    code = "conflict"
