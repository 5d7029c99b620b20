"""The webhook/callback HMAC signing contract (dispatch.routing.signing)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from dispatch.routing import signing

SECRET = b"test-secret"
BODY = b'{"answer": "accept", "responder": "13900000001"}'
TS = 1_767_225_600  # 2026-01-01T00:00:00Z


def _headers(body: bytes = BODY, ts: int = TS) -> tuple[str, str]:
    h = signing.sign(SECRET, body, ts)
    return h["X-Dispatch-Timestamp"], h["X-Dispatch-Signature"]


def test_round_trip_verifies() -> None:
    """A body signed with sign() verifies with the same secret at the same time."""
    ts, sig = _headers()
    assert signing.verify(SECRET, BODY, ts, sig, now=TS) is None


def test_sign_returns_exactly_the_two_headers() -> None:
    """sign() returns the timestamp as an integer string and a sha256=<hex> signature."""
    h = signing.sign(SECRET, BODY, TS)
    assert set(h) == {"X-Dispatch-Timestamp", "X-Dispatch-Signature"}
    assert h["X-Dispatch-Timestamp"] == str(TS)
    assert h["X-Dispatch-Signature"].startswith("sha256=")


def test_known_vector() -> None:
    """The signature is lowercase hex HMAC-SHA256(secret, b"<ts>." + body), per hmac.new()."""
    expected = hmac.new(SECRET, b"1767225600." + BODY, hashlib.sha256).hexdigest()
    assert signing.sign(SECRET, BODY, TS)["X-Dispatch-Signature"] == "sha256=" + expected
    assert expected == expected.lower()


def test_fixed_vector_literal() -> None:
    """A literal vector pins the scheme for other implementations (providers, other languages)."""
    expected = hmac.new(b"dev-secret", b"0.", hashlib.sha256).hexdigest()
    assert signing.sign(b"dev-secret", b"", 0) == {
        "X-Dispatch-Timestamp": "0",
        "X-Dispatch-Signature": "sha256=" + expected,
    }


def test_altered_body_is_bad_signature() -> None:
    """Changing one byte of the body makes the signature fail."""
    ts, sig = _headers()
    assert signing.verify(SECRET, BODY.replace(b"accept", b"declin"), ts, sig, now=TS) == (
        "bad_signature"
    )


def test_altered_timestamp_is_bad_signature() -> None:
    """Moving the timestamp (still within tolerance) breaks the MAC, so it cannot be refreshed."""
    _, sig = _headers()
    assert signing.verify(SECRET, BODY, str(TS + 1), sig, now=TS) == "bad_signature"


def test_wrong_secret_is_bad_signature() -> None:
    """A signature made with another secret fails."""
    ts, sig = _headers()
    assert signing.verify(b"other", BODY, ts, sig, now=TS) == "bad_signature"


def test_old_timestamp_is_stale() -> None:
    """A correctly signed request older than the tolerance is stale (replay protection)."""
    ts, sig = _headers()
    assert signing.verify(SECRET, BODY, ts, sig, now=TS + 301) == "stale_timestamp"
    assert signing.verify(SECRET, BODY, ts, sig, now=TS + 300) is None


def test_future_timestamp_is_stale() -> None:
    """A timestamp too far in the future is stale too."""
    ts, sig = _headers()
    assert signing.verify(SECRET, BODY, ts, sig, now=TS - 301) == "stale_timestamp"


def test_custom_tolerance() -> None:
    """tolerance_s widens or narrows the window."""
    ts, sig = _headers()
    assert signing.verify(SECRET, BODY, ts, sig, now=TS + 10, tolerance_s=5) == "stale_timestamp"
    assert signing.verify(SECRET, BODY, ts, sig, now=TS + 10, tolerance_s=10) is None


@pytest.mark.parametrize(
    ("ts", "sig"),
    [(None, "sha256=00"), (str(TS), None), (None, None), ("", "sha256=00"), (str(TS), "")],
)
def test_missing_header_is_missing_signature(ts: str | None, sig: str | None) -> None:
    """An absent or empty timestamp or signature header is missing_signature."""
    assert signing.verify(SECRET, BODY, ts, sig, now=TS) == "missing_signature"


@pytest.mark.parametrize("ts", ["abc", "-5", "+5", "1.5", "1_000", "١٢٣"])
def test_non_integer_timestamp_is_bad_timestamp(ts: str) -> None:
    """A timestamp that is not plain ASCII digits is bad_timestamp."""
    _, sig = _headers()
    assert signing.verify(SECRET, BODY, ts, sig, now=TS) == "bad_timestamp"


@pytest.mark.parametrize("sig", ["deadbeef", "sha1=abc", "sha256=", "sha256=ÿÿ", "sha256=\udcff"])
def test_malformed_signature_is_bad_signature(sig: str) -> None:
    """A signature of the wrong form (or non-ASCII) is bad_signature, never an exception."""
    assert signing.verify(SECRET, BODY, str(TS), sig, now=TS) == "bad_signature"


def test_uppercase_hex_is_rejected() -> None:
    """The contract says lowercase hex; an uppercased signature does not verify."""
    ts, sig = _headers()
    assert signing.verify(SECRET, BODY, ts, "sha256=" + sig[7:].upper(), now=TS) == (
        "bad_signature"
    )


def test_surrounding_whitespace_is_tolerated() -> None:
    """Whitespace around header values (some proxies add it) does not break verification."""
    ts, sig = _headers()
    assert signing.verify(SECRET, BODY, f" {ts} ", f"{sig} ", now=TS) is None
