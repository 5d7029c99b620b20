"""HMAC signing shared by the webhook channel and the responders' callbacks.

Both directions use the same scheme, so a provider (or ``simulators.responders``)
can verify what the server sends and the server can verify what comes back::

    X-Dispatch-Timestamp: <unix seconds, integer>
    X-Dispatch-Signature: sha256=<lowercase hex HMAC-SHA256(secret, b"<timestamp>." + body)>

The timestamp is inside the MAC and checked against a tolerance window so a
captured request cannot be replayed later (an old "accept" must never
acknowledge a new incident).
"""

from __future__ import annotations

import hashlib
import hmac
import re

TIMESTAMP_HEADER = "X-Dispatch-Timestamp"
SIGNATURE_HEADER = "X-Dispatch-Signature"
SIGNATURE_PREFIX = "sha256="
DEFAULT_TOLERANCE_S = 300

# verify() reasons, stable strings: they are logged and counted in metrics.
MISSING_SIGNATURE = "missing_signature"
BAD_TIMESTAMP = "bad_timestamp"
STALE_TIMESTAMP = "stale_timestamp"
BAD_SIGNATURE = "bad_signature"

# ASCII digits only: int() would also take "+5", "1_0" and non-ASCII digits, none of
# which a signer produces; rejecting them early gives a clearer reason than a MAC mismatch.
_TIMESTAMP_RE = re.compile(r"[0-9]{1,15}")


def signature(secret: bytes, body: bytes, timestamp: int) -> str:
    """The ``X-Dispatch-Signature`` value (``sha256=<hex>``) for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, f"{int(timestamp)}.".encode("ascii") + body, hashlib.sha256)
    return SIGNATURE_PREFIX + mac.hexdigest()


def sign(secret: bytes, body: bytes, timestamp: int) -> dict[str, str]:
    """Return the two signing headers for ``body`` sent at unix time ``timestamp``.

    ``timestamp`` is whole seconds; pass ``int(clock.seconds())``.
    """
    ts = int(timestamp)
    return {TIMESTAMP_HEADER: str(ts), SIGNATURE_HEADER: signature(secret, body, ts)}


def verify(
    secret: bytes,
    body: bytes,
    timestamp_header: str | None,
    signature_header: str | None,
    now: float,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
) -> str | None:
    """Check a signed request; return None when valid, else a short reason.

    Reasons, checked in this order: ``missing_signature`` (either header absent or
    empty), ``bad_timestamp`` (not an integer of ASCII digits), ``stale_timestamp``
    (more than ``tolerance_s`` seconds from ``now``, in either direction, since a
    clock far ahead is as suspicious as a replay), ``bad_signature`` (wrong MAC or
    not of the form ``sha256=<lowercase hex>``).  The MAC comparison is constant time.
    """
    if not timestamp_header or not signature_header:
        return MISSING_SIGNATURE
    ts_text = timestamp_header.strip()
    if not _TIMESTAMP_RE.fullmatch(ts_text):
        return BAD_TIMESTAMP
    ts = int(ts_text)
    if abs(now - ts) > tolerance_s:
        return STALE_TIMESTAMP
    expected = signature(secret, body, ts).encode("ascii")
    # Compare bytes: compare_digest on str raises TypeError for non-ASCII input,
    # and a garbage header must be a clean "bad_signature", not an exception.
    given = signature_header.strip().encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(expected, given):
        return BAD_SIGNATURE
    return None
