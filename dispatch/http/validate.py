"""Validation of API request bodies; every problem is reported at once, by field."""

from __future__ import annotations

import re
from typing import Any

from dispatch.districts import DISTRICTS
from dispatch.http.router import ApiError

PHONE = re.compile(r"^\+?[0-9][0-9\-]{1,19}$")
IMEI = re.compile(r"^[0-9]{15}$")
JT808_PHONE = re.compile(r"^[0-9]{1,20}$")
NATIVE_IDENT = re.compile(r"^[\x21-\x7e]{1,16}$")
ID_NUMBER = re.compile(r"^[0-9]{17}[0-9X]$")

LIVING = ("alone", "spouse", "children", "relatives", "institution")
HEALTH = ("healthy", "chronic", "disabled")
DISABILITY = ("limb", "vision", "hearing", "speech", "intellectual", "mental", "multiple", "other")
TIERS = ("family", "community")
PROTOCOLS = ("native", "gt06", "jt808")

OPTIONAL_TEXT = {"phone": 30, "id_number": 30, "township": 100, "village": 100, "notes": 2000}
CHOICES = {"living_situation": LIVING, "health": HEALTH, "disability_type": DISABILITY}
SUBSCRIBER_KEYS = {"name", "district", "address", "contacts", "device", *OPTIONAL_TEXT, *CHOICES}


def id_number_ok(value: str) -> bool:
    """Check a mainland resident ID number's format and ISO 7064 MOD 11-2 check digit."""
    if not ID_NUMBER.fullmatch(value):
        return False
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    total = sum(int(c) * w for c, w in zip(value[:17], weights, strict=True))
    return "10X98765432"[total % 11] == value[17]


class Errors:
    """Collects field problems; raises one 400 listing them all."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}

    def add(self, path: str, problem: str) -> None:
        self.fields.setdefault(path, problem)

    def text(self, body: dict, key: str, path: str, limit: int, required: bool) -> None:
        value = body.get(key)
        if value is None:
            if required:
                self.add(path, "is required")
        elif not isinstance(value, str) or not value.strip():
            self.add(path, "must be a non-empty string")
        elif len(value) > limit:
            self.add(path, f"must be at most {limit} characters")

    def raise_if_any(self) -> None:
        if self.fields:
            detail = "; ".join(f"{k} {v}" for k, v in self.fields.items())
            raise ApiError(400, "validation_failed", detail, {"fields": self.fields})


def _contacts(errors: Errors, contacts: Any) -> None:
    if not isinstance(contacts, list):
        errors.add("contacts", "must be a list")
        return
    if len(contacts) > 20:
        errors.add("contacts", "must have at most 20 entries")
    for n, c in enumerate(contacts):
        path = f"contacts[{n}]"
        if not isinstance(c, dict):
            errors.add(path, "must be an object")
            continue
        unknown = set(c) - {"name", "phone", "relation", "tier"}
        if unknown:
            errors.add(path, f"has unknown fields {sorted(unknown)}")
        errors.text(c, "name", f"{path}.name", 100, True)
        errors.text(c, "relation", f"{path}.relation", 50, False)
        phone = c.get("phone")
        if not isinstance(phone, str) or not PHONE.fullmatch(phone):
            errors.add(f"{path}.phone", "must be a phone number (digits, optional + and -)")
        if c.get("tier", "family") not in TIERS:
            errors.add(f"{path}.tier", f"must be one of {list(TIERS)}")


def device_problem(device: Any) -> str | None:
    """Why a device binding is unacceptable, or None."""
    if not isinstance(device, dict) or set(device) - {"protocol", "ident"}:
        return "must be an object with protocol and ident"
    protocol, ident = device.get("protocol"), device.get("ident")
    if protocol not in PROTOCOLS:
        return f"protocol must be one of {list(PROTOCOLS)}"
    if not isinstance(ident, str):
        return "ident must be a string"
    pattern = {"native": NATIVE_IDENT, "gt06": IMEI, "jt808": JT808_PHONE}[protocol]
    if not pattern.fullmatch(ident):
        hint = {
            "native": "1-16 printable ASCII characters",
            "gt06": "a 15-digit IMEI",
            "jt808": "the terminal phone number, 1-20 digits",
        }[protocol]
        return f"ident for {protocol} must be {hint}"
    return None


def subscriber(body: Any, partial: bool = False) -> dict[str, Any]:
    """Validate a create (or, with ``partial``, a PATCH) body; returns it unchanged."""
    if not isinstance(body, dict):
        raise ApiError(400, "validation_failed", "body must be a JSON object")
    errors = Errors()
    unknown = set(body) - SUBSCRIBER_KEYS
    if unknown:
        errors.add("body", f"has unknown fields {sorted(unknown)}")
    for key, limit in (("name", 100), ("address", 300)):
        if not partial or key in body:
            errors.text(body, key, key, limit, True)
    if (not partial or "district" in body) and not (
        isinstance(body.get("district"), str) and body["district"] in DISTRICTS
    ):
        errors.add("district", f"must be one of {list(DISTRICTS)}")
    for key, limit in OPTIONAL_TEXT.items():
        errors.text(body, key, key, limit, False)
    for key, choices in CHOICES.items():
        if body.get(key) is not None and body[key] not in choices:
            errors.add(key, f"must be one of {list(choices)}")
    if body.get("id_number") and not id_number_ok(str(body["id_number"])):
        errors.add("id_number", "is not a valid 18-character ID number (check digit)")
    if "contacts" in body or not partial:
        _contacts(errors, body.get("contacts", []))
    if body.get("device") is not None:
        problem = device_problem(body["device"])
        if problem:
            errors.add("device", problem)
    errors.raise_if_any()
    return body
