"""Escalation policies: validation of stored documents and their expansion into waves.

Times are chosen in Asia/Shanghai (UTC+8): 10:00 local is 02:00 UTC (day) and
23:00 local is 15:00 UTC (night, in the default 22:00-07:00 window).
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from dispatch.routing import policy as pol
from dispatch.routing.policy import PolicyError, Profile, Target, Wave

DAY = datetime(2027, 1, 16, 2, 0, tzinfo=UTC)  # 10:00 in Wenzhou
NIGHT = datetime(2027, 1, 15, 15, 0, tzinfo=UTC)  # 23:00 in Wenzhou
RELAY = {"relay_110": "110", "relay_120": "120"}

SON = {"name": "Li Wei", "phone": "13900000001", "relation": "son", "tier": "family"}
DAUGHTER = {"name": "Li Na", "phone": "13900000002", "relation": "daughter", "tier": "family"}
WORKER = {"name": "Zhao Min", "phone": "13900000009", "relation": None, "tier": "community"}
CONTACTS = [SON, DAUGHTER, WORKER]


def doc(*steps: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A policy document for SOS with the given steps."""
    return {"kinds": ["sos"], "steps": list(steps), **top}


def phones(wave: Wave) -> list[str]:
    """The phone numbers a wave calls."""
    return [t.phone for t in wave.targets]


def refused(document: Any, match: str) -> None:
    """Assert parse() refuses ``document`` with a PolicyError matching ``match``."""
    with pytest.raises(PolicyError, match=match):
        pol.parse(document)


# --- parse: what is accepted ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(pol.DEFAULT_POLICIES))
def test_every_shipped_default_parses(name: str) -> None:
    """Each shipped default policy is itself a valid policy document."""
    parsed = pol.parse(pol.DEFAULT_POLICIES[name])
    assert parsed.steps
    assert set(parsed.kinds) <= set(pol.KINDS)


def test_defaults_cover_every_incident_kind() -> None:
    """Between them the shipped defaults handle every incident kind."""
    kinds = {k for d in pol.DEFAULT_POLICIES.values() for k in pol.parse(d).kinds}
    assert kinds == set(pol.KINDS)


def test_parse_fills_step_defaults() -> None:
    """A minimal step defaults to in_order voice, 60 s wait, one round, no conditions."""
    parsed = pol.parse(doc({"tier": "family"}))
    assert parsed.steps == (pol.Step("family", "in_order", ("voice",), 60, 1, {}),)
    assert (parsed.relay_deadline_s, parsed.night_from, parsed.night_to) == (300, 22, 7)


def test_parse_relay_tier_defaults_to_relay_channel() -> None:
    """A relay step without channels gets ['relay']."""
    parsed = pol.parse(doc({"tier": "relay_110"}))
    assert parsed.steps[0].channels == ("relay",)


def test_parse_accepts_boundaries() -> None:
    """wait_s 0 and 86400, rounds 1 and 5, and exactly 20 steps are all allowed."""
    pol.parse(doc({"tier": "family", "wait_s": 0, "rounds": 5}))
    pol.parse(doc({"tier": "family", "wait_s": 24 * 3600, "rounds": 1}))
    assert len(pol.parse(doc(*[{"tier": "family"}] * 20)).steps) == 20


# --- parse: what is refused -------------------------------------------------------------


@pytest.mark.parametrize("document", [[], "alarm", None, 3])
def test_refuses_non_object(document: Any) -> None:
    """A document that is not a JSON object is refused as such."""
    refused(document, "must be a JSON object")


@pytest.mark.parametrize("document", [{"kinds": ["sos"]}, doc(), {"kinds": ["sos"], "steps": {}}])
def test_refuses_policy_that_calls_nobody(document: dict[str, Any]) -> None:
    """Missing, empty or non-list steps are refused because the policy calls nobody."""
    refused(document, "steps must be a non-empty list.*calls nobody")


def test_refuses_unknown_tier() -> None:
    """An unknown tier is refused naming the step and the bad value."""
    bad = doc({"tier": "family"}, {"tier": "doctor"})
    refused(bad, r"steps\[1\]\.tier must be one of.*'doctor'")


def test_refuses_unknown_target_kind() -> None:
    """An unknown targets mode is refused naming the bad value."""
    refused(doc({"tier": "family", "targets": "random"}), r"steps\[0\]\.targets.*'random'")


@pytest.mark.parametrize("channels", [["email"], [], "voice", ["voice", "fax"]])
def test_refuses_unknown_or_empty_channels(channels: Any) -> None:
    """Channels must be a non-empty list of voice/sms/relay."""
    refused(doc({"tier": "family", "channels": channels}), r"steps\[0\]\.channels must be")


@pytest.mark.parametrize(
    "step",
    [
        {"tier": "relay_120", "channels": ["voice"]},
        {"tier": "relay_110", "channels": ["relay", "sms"]},
        {"tier": "family", "channels": ["voice", "relay"]},
        {"tier": "community", "channels": ["relay"]},
    ],
)
def test_refuses_relay_channel_mismatch(step: dict[str, Any]) -> None:
    """Relay tiers use exactly ['relay'] and no other tier may use 'relay'."""
    refused(doc(step), "relay tiers use exactly")


@pytest.mark.parametrize("value", [-1, 24 * 3600 + 1, "60", 1.5, True, None])
def test_refuses_bad_wait(value: Any) -> None:
    """wait_s must be an int (not a bool) from 0 to 86400."""
    refused(doc({"tier": "family", "wait_s": value}), r"wait_s must be an integer from 0 to 86400")


@pytest.mark.parametrize("value", [0, 6, False, "2"])
def test_refuses_bad_rounds(value: Any) -> None:
    """rounds must be an int from 1 to 5."""
    refused(doc({"tier": "family", "rounds": value}), r"rounds must be an integer from 1 to 5")


def test_refuses_unknown_step_field() -> None:
    """A misspelt step field is refused by name rather than silently ignored."""
    refused(doc({"tier": "family", "delay": 30}), r"steps\[0\] has unknown fields \['delay'\]")


def test_refuses_unknown_top_level_field() -> None:
    """An unknown top-level field is refused by name."""
    refused(doc({"tier": "family"}, deadline=30), r"unknown fields \['deadline'\]")


def test_refuses_unknown_condition() -> None:
    """An unknown when-condition is refused, listing the known ones."""
    refused(
        doc({"tier": "family", "when": {"weather": "rain"}}),
        r"unknown conditions \['weather'\]; known:",
    )


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_refuses_non_bool_night(value: Any) -> None:
    """when.night must be true or false."""
    refused(doc({"tier": "family", "when": {"night": value}}), "when.night must be true or false")


def test_refuses_non_bool_lives_alone() -> None:
    """when.lives_alone must be true or false."""
    refused(doc({"tier": "family", "when": {"lives_alone": "y"}}), "when.lives_alone must be")


@pytest.mark.parametrize(
    "when, match",
    [
        ({"kinds": ["burglary"]}, "when.kinds must be a list"),
        ({"kinds": "sos"}, "when.kinds must be a list"),
        ({"health": "dementia"}, "when.health must be a list of strings"),
        ({"disability": [1]}, "when.disability must be a list of strings"),
        ("night", "when must be an object"),
    ],
)
def test_refuses_bad_condition_values(when: Any, match: str) -> None:
    """Condition values of the wrong shape are refused by name."""
    refused(doc({"tier": "family", "when": when}), match)


@pytest.mark.parametrize("kinds", [["burglary"], ["sos", "earthquake"], [], "sos", None])
def test_refuses_unknown_kind(kinds: Any) -> None:
    """kinds must be a non-empty list of known incident kinds."""
    refused({"kinds": kinds, "steps": [{"tier": "family"}]}, "kinds must be a non-empty list")


def test_refuses_more_than_20_steps() -> None:
    """A policy of 21 steps is refused."""
    refused(doc(*[{"tier": "family"}] * 21), "at most 20 steps")


@pytest.mark.parametrize("night", [{"from": 22}, {"from": 24, "to": 7}, "22-7"])
def test_refuses_bad_night_window(night: Any) -> None:
    """The night window needs integer hours 0-23 for both from and to."""
    with pytest.raises(PolicyError, match="night"):
        pol.parse(doc({"tier": "family"}, night=night))


@pytest.mark.parametrize(
    "document",
    [
        {"kinds": [["sos"]], "steps": [{"tier": "family"}]},
        doc({"tier": "family", "channels": [["voice"]]}),
        doc({"tier": "family", "when": {"kinds": [{"sos": 1}]}}),
    ],
)
def test_refuses_unhashable_list_items(document: dict[str, Any]) -> None:
    """A list item that is itself a list/object is refused with PolicyError, not TypeError."""
    with pytest.raises(PolicyError):
        pol.parse(document)


# --- plan --------------------------------------------------------------------------------


def test_in_order_with_rounds_alternates_contacts() -> None:
    """in_order over two family contacts with rounds 2 gives four waves: son, daughter, x2."""
    policy = pol.parse(doc({"tier": "family", "channels": ["voice", "sms"], "rounds": 2}))
    waves = pol.plan(policy, "sos", Profile(), CONTACTS, DAY, RELAY)
    assert [phones(w) for w in waves] == [["13900000001"], ["13900000002"]] * 2
    assert all(w.tier == "family" and w.channels == ("voice", "sms") for w in waves)
    assert all(w.wait_s == 60 and not w.relay for w in waves)
    assert waves[0].targets[0] == Target("Li Wei", "13900000001", "son")


def test_all_targets_one_wave() -> None:
    """targets 'all' calls every contact of the tier in one wave."""
    policy = pol.parse(doc({"tier": "family", "targets": "all", "wait_s": 45}))
    waves = pol.plan(policy, "sos", Profile(), CONTACTS, DAY, RELAY)
    assert len(waves) == 1
    assert phones(waves[0]) == ["13900000001", "13900000002"]
    assert waves[0].wait_s == 45


def test_on_duty_takes_first_community_contact() -> None:
    """targets 'on_duty' calls only the first contact of the tier."""
    other = dict(WORKER, name="Qian Lei", phone="13900000010")
    policy = pol.parse(doc({"tier": "community", "targets": "on_duty"}))
    waves = pol.plan(policy, "sos", Profile(), [*CONTACTS, other], DAY, RELAY)
    assert [phones(w) for w in waves] == [["13900000009"]]


def test_step_without_contacts_is_skipped() -> None:
    """A step whose tier has nobody to call yields no wave (and costs no wait)."""
    policy = pol.parse(doc({"tier": "community", "wait_s": 900}, {"tier": "family"}))
    waves = pol.plan(policy, "sos", Profile(), [SON], DAY, RELAY)
    assert [(w.tier, phones(w)) for w in waves] == [("family", ["13900000001"])]


def test_contact_without_tier_counts_as_family() -> None:
    """A contact with no tier is treated as family."""
    policy = pol.parse(doc({"tier": "family"}))
    plain = {"name": "Li Wei", "phone": "13900000001"}
    waves = pol.plan(policy, "sos", Profile(), [plain], DAY, RELAY)
    assert waves == [Wave("family", ("voice",), (Target("Li Wei", "13900000001"),), 60)]


def test_default_alarm_by_day_calls_family_first() -> None:
    """At 10:00 local the default alarm policy calls family (2 rounds), then community."""
    policy = pol.parse(pol.DEFAULT_POLICIES["alarm"])
    waves = pol.plan(policy, "sos", Profile(), CONTACTS, DAY, RELAY)
    assert [(w.tier, phones(w)) for w in waves] == [
        ("family", ["13900000001"]),
        ("family", ["13900000002"]),
        ("family", ["13900000001"]),
        ("family", ["13900000002"]),
        ("community", ["13900000009"]),
        ("relay_120", ["120"]),
        ("operator", []),
    ]
    assert [w.wait_s for w in waves] == [60, 60, 60, 60, 90, 300, 0]


def test_default_alarm_at_night_calls_community_first() -> None:
    """At 23:00 local the default alarm policy calls community before family (one round)."""
    policy = pol.parse(pol.DEFAULT_POLICIES["alarm"])
    waves = pol.plan(policy, "fall", Profile(), CONTACTS, NIGHT, RELAY)
    assert [(w.tier, phones(w)) for w in waves] == [
        ("community", ["13900000009"]),
        ("family", ["13900000001"]),
        ("family", ["13900000002"]),
        ("relay_120", ["120"]),
        ("operator", []),
    ]


def test_lives_alone_condition() -> None:
    """A lives_alone step applies only to subscribers whose living situation matches."""
    policy = pol.parse(
        doc(
            {"tier": "community", "when": {"lives_alone": True}},
            {"tier": "family"},
        )
    )
    alone = pol.plan(policy, "sos", Profile(lives_alone=True), CONTACTS, DAY, RELAY)
    together = pol.plan(policy, "sos", Profile(lives_alone=False), CONTACTS, DAY, RELAY)
    assert [w.tier for w in alone] == ["community", "family", "family"]
    assert [w.tier for w in together] == ["family", "family"]


def test_health_condition() -> None:
    """A health step applies only when the subscriber's health is listed (None never is)."""
    policy = pol.parse(doc({"tier": "relay_120", "when": {"health": ["dementia", "cardiac"]}}))
    assert len(pol.plan(policy, "sos", Profile(health="cardiac"), [], DAY, RELAY)) == 1
    assert pol.plan(policy, "sos", Profile(health="good"), [], DAY, RELAY) == []
    assert pol.plan(policy, "sos", Profile(), [], DAY, RELAY) == []


def test_disability_condition() -> None:
    """A disability step applies only when the subscriber's disability type is listed."""
    policy = pol.parse(doc({"tier": "operator", "when": {"disability": ["visual"]}}))
    assert len(pol.plan(policy, "sos", Profile(disability="visual"), [], DAY, RELAY)) == 1
    assert pol.plan(policy, "sos", Profile(disability="hearing"), [], DAY, RELAY) == []


def test_kinds_condition() -> None:
    """A step limited to falls is skipped for an SOS of the same policy."""
    policy = pol.parse(
        {
            "kinds": ["sos", "fall"],
            "steps": [{"tier": "relay_120", "when": {"kinds": ["fall"]}}, {"tier": "family"}],
        }
    )
    assert [w.tier for w in pol.plan(policy, "fall", Profile(), [SON], DAY, RELAY)] == [
        "relay_120",
        "family",
    ]
    assert [w.tier for w in pol.plan(policy, "sos", Profile(), [SON], DAY, RELAY)] == ["family"]


def test_relay_step_uses_configured_desk_number() -> None:
    """A relay step becomes one relay wave to the configured desk number."""
    policy = pol.parse(doc({"tier": "relay_120", "wait_s": 300}))
    numbers = {"relay_110": "0577-110", "relay_120": "0577-120"}
    waves = pol.plan(policy, "sos", Profile(), CONTACTS, DAY, numbers)
    assert waves == [
        Wave("relay_120", ("relay",), (Target("120 desk", "0577-120"),), 300, relay=True)
    ]


def test_operator_step_has_no_targets() -> None:
    """An operator step becomes a wave with no targets or channels."""
    policy = pol.parse(doc({"tier": "operator", "wait_s": 0}))
    assert pol.plan(policy, "sos", Profile(), CONTACTS, DAY, RELAY) == [Wave("operator", (), (), 0)]


@pytest.mark.parametrize(
    "utc_hour, utc_minute, night",
    [
        (13, 59, False),  # 21:59 local
        (14, 0, True),  # 22:00 local
        (16, 30, True),  # 00:30 local, after midnight
        (22, 59, True),  # 06:59 local
        (23, 0, False),  # 07:00 local
        (2, 0, False),  # 10:00 local
    ],
)
def test_is_night_wraps_midnight(utc_hour: int, utc_minute: int, night: bool) -> None:
    """The 22:00-07:00 window is judged in Wenzhou time and spans midnight."""
    policy = pol.parse(pol.DEFAULT_POLICIES["alarm"])
    at = datetime(2027, 1, 15, utc_hour, utc_minute, tzinfo=UTC)
    assert pol.is_night(policy, at) is night


def test_is_night_window_within_one_day() -> None:
    """A window that does not wrap (01:00-05:00) is night only inside it."""
    policy = pol.parse(doc({"tier": "family"}, night={"from": 1, "to": 5}))
    assert pol.is_night(policy, datetime(2027, 1, 15, 18, 0, tzinfo=UTC))  # 02:00 local
    assert not pol.is_night(policy, datetime(2027, 1, 15, 21, 0, tzinfo=UTC))  # 05:00 local
    assert not pol.is_night(policy, datetime(2027, 1, 15, 15, 0, tzinfo=UTC))  # 23:00 local


def test_wave_json_round_trip() -> None:
    """Wave.to_json/from_json round-trip every field, relay flag included."""
    policy = pol.parse(pol.DEFAULT_POLICIES["alarm"])
    waves = pol.plan(policy, "sos", Profile(), CONTACTS, DAY, RELAY)
    for wave in waves:
        data = wave.to_json()
        assert Wave.from_json(copy.deepcopy(data)) == wave
    assert waves[5].to_json() == {
        "tier": "relay_120",
        "channels": ["relay"],
        "wait_s": 300,
        "relay": True,
        "targets": [{"name": "120 desk", "phone": "120", "relation": None}],
    }
