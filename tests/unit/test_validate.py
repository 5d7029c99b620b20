"""Validation of subscriber bodies: every problem reported at once, by field path."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from dispatch.districts import DISTRICTS
from dispatch.http import validate
from dispatch.http.router import ApiError

VALID_ID = "11010519491231002X"


def minimal(protocol: str = "native", ident: str = "TERM-0001") -> dict[str, Any]:
    """The smallest body the interface accepts for creating a subscriber."""
    return {
        "name": "Wang Fang",
        "district": "鹿城区",
        "address": "1 Wuma Street, Lucheng",
        "contacts": [{"name": "Wang Lei", "phone": "13800138000", "relation": "son"}],
        "device": {"protocol": protocol, "ident": ident},
    }


def problems(body: Any, partial: bool = False) -> dict[str, str]:
    """The field -> problem map of the 400 that validation raises."""
    with pytest.raises(ApiError) as err:
        validate.subscriber(body, partial=partial)
    assert err.value.status == 400
    assert err.value.code == "validation_failed"
    return err.value.extra.get("fields", {})


def with_(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``body`` with one dotted/indexed path set (``contacts.0.phone``)."""
    out = copy.deepcopy(body)
    target: Any = out
    *parents, last = path.split(".")
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return out


@pytest.mark.parametrize(
    ("protocol", "ident"),
    [("native", "TERM-0001"), ("gt06", "860000000000001"), ("jt808", "13800138000")],
)
def test_minimal_body_accepted(protocol: str, ident: str) -> None:
    """The smallest documented body is accepted, for each terminal protocol, and returned as is."""
    body = minimal(protocol, ident)
    assert validate.subscriber(body) == minimal(protocol, ident)


@pytest.mark.parametrize("district", sorted(DISTRICTS))
def test_every_district_accepted(district: str) -> None:
    """Every district of dispatch.districts is accepted."""
    validate.subscriber(with_(minimal(), "district", district))


def test_full_body_accepted() -> None:
    """All optional fields with good values are accepted."""
    body = minimal() | {
        "phone": "0577-88880000",
        "id_number": VALID_ID,
        "township": "Wuma",
        "village": "East",
        "living_situation": "alone",
        "health": "chronic",
        "disability_type": "vision",
        "notes": "hard of hearing",
    }
    body["contacts"].append({"name": "Li", "phone": "+8613900000000", "tier": "community"})
    validate.subscriber(body)


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("name", "", "name"),
        ("name", "   ", "name"),
        ("name", 7, "name"),
        ("name", "x" * 101, "name"),
        ("address", None, "address"),
        ("district", "Springfield", "district"),
        ("contacts", "Wang Lei", "contacts"),
        ("contacts.0", "Wang Lei", "contacts[0]"),
        ("contacts.0.name", "", "contacts[0].name"),
        ("contacts.0.phone", "call me", "contacts[0].phone"),
        ("contacts.0.phone", None, "contacts[0].phone"),
        ("contacts.0.tier", "neighbour", "contacts[0].tier"),
        ("contacts.0.relation", "x" * 51, "contacts[0].relation"),
        ("device", {"protocol": "native"}, "device"),
        ("device", {"protocol": "x25", "ident": "1"}, "device"),
        ("device.ident", "has space", "device"),
        ("device.ident", "x" * 17, "device"),
        ("living_situation", "tent", "living_situation"),
        ("health", "great", "health"),
        ("disability_type", "none", "disability_type"),
        ("notes", "x" * 2001, "notes"),
    ],
)
def test_bad_field_reported_by_path(path: str, value: Any, field: str) -> None:
    """Each bad field gives a 400 validation_failed whose fields name exactly that path."""
    assert set(problems(with_(minimal(), path, value))) == {field}


def test_missing_required_fields_reported() -> None:
    """A create without name, district and address reports each of them."""
    assert set(problems({})) == {"name", "district", "address"}


def test_second_contact_phone_path() -> None:
    """A bad phone in the second contact is reported as contacts[1].phone."""
    body = minimal()
    body["contacts"].append({"name": "Li", "phone": "not-a-phone!"})
    assert set(problems(body)) == {"contacts[1].phone"}


def test_several_problems_reported_at_once() -> None:
    """Every problem in a body is reported in one answer, not only the first."""
    body = minimal()
    body["name"] = ""
    body["district"] = "Nowhere"
    body["contacts"].append({"name": "", "phone": "x"})
    body["device"] = {"protocol": "gt06", "ident": "123"}
    assert set(problems(body)) == {
        "name",
        "district",
        "contacts[1].name",
        "contacts[1].phone",
        "device",
    }


def test_detail_names_every_field() -> None:
    """The human-readable detail mentions each offending field."""
    body = with_(with_(minimal(), "name", ""), "contacts.0.phone", "x")
    with pytest.raises(ApiError) as err:
        validate.subscriber(body)
    assert "name" in err.value.detail and "contacts[0].phone" in err.value.detail


def test_unknown_field_refused() -> None:
    """A field the interface does not define is refused and named."""
    fields = problems(minimal() | {"nickname": "Granny"})
    assert set(fields) == {"body"}
    assert "nickname" in fields["body"]


def test_unknown_contact_field_refused() -> None:
    """An unknown field inside a contact is refused at that contact's path."""
    body = with_(minimal(), "contacts.0.email", "a@b.c")
    assert set(problems(body)) == {"contacts[0]"}


def test_unknown_device_field_refused() -> None:
    """An unknown field in the device binding is refused."""
    assert set(problems(with_(minimal(), "device.secret", "1"))) == {"device"}


def test_body_must_be_object() -> None:
    """A JSON array or string is not a body."""
    problems(["name"])
    problems("name")


@pytest.mark.parametrize("imei", ["86000000000001", "8600000000000012", "86000000000000A", ""])
def test_bad_imei_for_gt06_refused(imei: str) -> None:
    """A gt06 ident must be a 15-digit IMEI."""
    fields = problems(minimal("gt06", imei))
    assert set(fields) == {"device"} and "IMEI" in fields["device"]


def test_jt808_ident_must_be_digits() -> None:
    """A jt808 ident is the terminal's phone number: digits only."""
    assert set(problems(minimal("jt808", "138-0013"))) == {"device"}


def test_id_number_check_digit() -> None:
    """A resident ID number with a correct check digit passes; one flipped digit fails."""
    assert validate.id_number_ok(VALID_ID)
    validate.subscriber(minimal() | {"id_number": VALID_ID})
    flipped = VALID_ID[:15] + "1" + VALID_ID[16:]  # sequence number 002 -> 012
    assert flipped == "11010519491231012X"
    assert not validate.id_number_ok(flipped)
    fields = problems(minimal() | {"id_number": flipped})
    assert set(fields) == {"id_number"}


@pytest.mark.parametrize("bad", ["11010519491231002", "1101051949123100XX", "11010519491231002x"])
def test_id_number_format(bad: str) -> None:
    """ID numbers are 17 digits plus a digit or X."""
    assert not validate.id_number_ok(bad)


def test_partial_allows_subset() -> None:
    """With partial=True a body with only some fields (a PATCH) is accepted."""
    assert validate.subscriber({"address": "2 Wuma Street"}, partial=True) == {
        "address": "2 Wuma Street"
    }
    validate.subscriber({}, partial=True)
    validate.subscriber({"contacts": []}, partial=True)


def test_partial_still_checks_given_fields() -> None:
    """partial=True skips missing fields but still validates the ones present."""
    assert set(problems({"name": "", "district": "Nowhere"}, partial=True)) == {
        "name",
        "district",
    }
    assert set(problems({"contacts": [{"name": "A", "phone": "?"}]}, partial=True)) == {
        "contacts[0].phone"
    }
    assert set(problems({"nickname": "x"}, partial=True)) == {"body"}


@pytest.mark.parametrize("district", [["鹿城区"], {"name": "鹿城区"}])
def test_unhashable_district_reported(district: Any) -> None:
    """A district given as a list or object is a field error, not a crash (500)."""
    assert set(problems(with_(minimal(), "district", district))) == {"district"}


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("contacts.0.phone", "13800138000\n", "contacts[0].phone"),
        ("device", {"protocol": "gt06", "ident": "860000000000001\n"}, "device"),
        ("device", {"protocol": "native", "ident": "TERM-0001\n"}, "device"),
        ("device", {"protocol": "jt808", "ident": "13800138000\n"}, "device"),
        ("id_number", VALID_ID + "\n", "id_number"),
    ],
)
def test_trailing_newline_refused(path: str, value: Any, field: str) -> None:
    """A phone, ident or ID number with a trailing newline is not accepted."""
    assert set(problems(with_(minimal(), path, value))) == {field}
