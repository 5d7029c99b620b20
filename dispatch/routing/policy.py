"""Escalation policies: data that says who is called, how, and for how long.

A policy is a JSON document (stored, versioned, editable through the API)::

    {"kinds": ["sos", "fall"], "relay_deadline_s": 300, "night": {"from": 22, "to": 7},
     "steps": [{"tier": "family", "targets": "in_order", "channels": ["voice"],
                "wait_s": 60, "rounds": 2, "when": {"night": false}}, ...]}

:func:`parse` refuses a bad document with a message naming the problem, so a
broken policy is found when it is saved, not at 3 a.m.  :func:`plan` turns a
policy, a subscriber and an incident into concrete *waves*: one set of calls
made together, then a wait for someone to accept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

TIERS = ("family", "community", "relay_110", "relay_120", "operator")
KINDS = ("sos", "fall", "care_missed", "offline", "low_battery")
TARGETS = ("in_order", "all", "on_duty")
CHANNELS = ("voice", "sms", "relay")
CONDITIONS = {"kinds", "night", "lives_alone", "health", "disability"}
LOCAL_TZ = ZoneInfo("Asia/Shanghai")
MAX_STEPS = 20
MAX_ROUNDS = 5
MAX_WAIT_S = 24 * 3600


def _names(value: Any, allowed: tuple[str, ...]) -> bool:
    """A non-empty list of strings drawn from ``allowed`` (checked before hashing anything)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, str) and v in allowed for v in value)
    )


class PolicyError(ValueError):
    """A policy document that cannot be used; the message says why."""


@dataclass(frozen=True)
class Step:
    """One rung of the ladder."""

    tier: str
    targets: str = "in_order"
    channels: tuple[str, ...] = ("voice",)
    wait_s: int = 60
    rounds: int = 1
    when: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Policy:
    """A validated policy document."""

    kinds: tuple[str, ...]
    steps: tuple[Step, ...]
    relay_deadline_s: int = 300
    night_from: int = 22
    night_to: int = 7


@dataclass(frozen=True)
class Profile:
    """What conditions may test about a subscriber."""

    lives_alone: bool = False
    health: str | None = None
    disability: str | None = None


@dataclass(frozen=True)
class Target:
    """Someone (or some desk) to reach."""

    name: str
    phone: str
    relation: str | None = None


@dataclass(frozen=True)
class Wave:
    """Calls placed together; the engine then waits ``wait_s`` for an acceptance."""

    tier: str
    channels: tuple[str, ...]
    targets: tuple[Target, ...]
    wait_s: int
    relay: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "tier": self.tier,
            "channels": list(self.channels),
            "wait_s": self.wait_s,
            "relay": self.relay,
            "targets": [
                {"name": t.name, "phone": t.phone, "relation": t.relation} for t in self.targets
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Wave:
        return cls(
            data["tier"],
            tuple(data["channels"]),
            tuple(Target(t["name"], t["phone"], t.get("relation")) for t in data["targets"]),
            int(data["wait_s"]),
            bool(data.get("relay")),
        )


def _int(doc: dict[str, Any], key: str, default: int, lo: int, hi: int, where: str) -> int:
    value = doc.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise PolicyError(f"{where}{key} must be an integer from {lo} to {hi}, got {value!r}")
    return value


def _when(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}when must be an object")
    unknown = set(raw) - CONDITIONS
    if unknown:
        raise PolicyError(
            f"{where}when has unknown conditions {sorted(unknown)}; known: {sorted(CONDITIONS)}"
        )
    for key in ("night", "lives_alone"):
        if key in raw and not isinstance(raw[key], bool):
            raise PolicyError(f"{where}when.{key} must be true or false")
    if "kinds" in raw and not _names(raw["kinds"], KINDS):
        raise PolicyError(f"{where}when.kinds must be a list drawn from {list(KINDS)}")
    for key in ("health", "disability"):
        if key in raw and not (
            isinstance(raw[key], list) and all(isinstance(v, str) for v in raw[key])
        ):
            raise PolicyError(f"{where}when.{key} must be a list of strings")
    return dict(raw)


def _step(raw: Any, n: int) -> Step:
    where = f"steps[{n}]."
    if not isinstance(raw, dict):
        raise PolicyError(f"steps[{n}] must be an object")
    unknown = set(raw) - {"tier", "targets", "channels", "wait_s", "rounds", "when"}
    if unknown:
        raise PolicyError(f"{where[:-1]} has unknown fields {sorted(unknown)}")
    tier = raw.get("tier")
    if tier not in TIERS:
        raise PolicyError(f"{where}tier must be one of {list(TIERS)}, got {tier!r}")
    targets = raw.get("targets", "in_order")
    if targets not in TARGETS:
        raise PolicyError(f"{where}targets must be one of {list(TARGETS)}, got {targets!r}")
    relay = tier.startswith("relay_")
    channels = raw.get("channels", ["relay"] if relay else ["voice"])
    if not _names(channels, CHANNELS):
        raise PolicyError(f"{where}channels must be a non-empty list drawn from {list(CHANNELS)}")
    if relay != ("relay" in channels) or (relay and len(channels) != 1):
        raise PolicyError(f"{where}channels: relay tiers use exactly ['relay'], others never do")
    return Step(
        tier=tier,
        targets=targets,
        channels=tuple(channels),
        wait_s=_int(raw, "wait_s", 60, 0, MAX_WAIT_S, where),
        rounds=_int(raw, "rounds", 1, 1, MAX_ROUNDS, where),
        when=_when(raw.get("when"), where),
    )


def parse(doc: Any) -> Policy:
    """Validate a policy document; raise PolicyError naming the first problem."""
    if not isinstance(doc, dict):
        raise PolicyError("a policy must be a JSON object")
    unknown = set(doc) - {"kinds", "steps", "relay_deadline_s", "night", "name"}
    if unknown:
        raise PolicyError(f"policy has unknown fields {sorted(unknown)}")
    kinds = doc.get("kinds")
    if not _names(kinds, KINDS):
        raise PolicyError(f"kinds must be a non-empty list drawn from {list(KINDS)}")
    steps = doc.get("steps")
    if not isinstance(steps, list) or not steps:
        raise PolicyError("steps must be a non-empty list: a policy that calls nobody helps nobody")
    if len(steps) > MAX_STEPS:
        raise PolicyError(f"at most {MAX_STEPS} steps")
    parsed = tuple(_step(s, n) for n, s in enumerate(steps))
    night = doc.get("night", {"from": 22, "to": 7})
    if not isinstance(night, dict) or set(night) != {"from", "to"}:
        raise PolicyError('night must be {"from": hour, "to": hour}')
    return Policy(
        kinds=tuple(kinds),
        steps=parsed,
        relay_deadline_s=_int(doc, "relay_deadline_s", 300, 0, MAX_WAIT_S, ""),
        night_from=_int(night, "from", 22, 0, 23, "night."),
        night_to=_int(night, "to", 7, 0, 23, "night."),
    )


def is_night(policy: Policy, at: datetime) -> bool:
    """Whether ``at`` falls in the policy's night, in Wenzhou local time."""
    hour = at.astimezone(LOCAL_TZ).hour
    if policy.night_from <= policy.night_to:
        return policy.night_from <= hour < policy.night_to
    return hour >= policy.night_from or hour < policy.night_to


def applies(step: Step, kind: str, profile: Profile, night: bool) -> bool:
    """Whether every condition of ``step`` holds."""
    w = step.when
    return (
        ("kinds" not in w or kind in w["kinds"])
        and ("night" not in w or w["night"] == night)
        and ("lives_alone" not in w or w["lives_alone"] == profile.lives_alone)
        and ("health" not in w or profile.health in w["health"])
        and ("disability" not in w or profile.disability in w["disability"])
    )


def plan(
    policy: Policy,
    kind: str,
    profile: Profile,
    contacts: list[dict[str, Any]],
    at: datetime,
    relay_numbers: dict[str, str],
) -> list[Wave]:
    """Expand a policy into waves for one incident.

    ``contacts`` are the subscriber's, in calling order, each with a ``tier``.
    Steps whose tier has nobody to call are skipped (an empty step must not cost
    the subscriber its wait).
    """
    night = is_night(policy, at)
    waves: list[Wave] = []
    for step in policy.steps:
        if not applies(step, kind, profile, night):
            continue
        waves.extend(_waves(step, contacts, relay_numbers) * step.rounds)
    return waves


def _waves(step: Step, contacts: list[dict[str, Any]], relay: dict[str, str]) -> list[Wave]:
    if step.tier == "operator":
        return [Wave("operator", (), (), step.wait_s)]
    if step.tier.startswith("relay_"):
        desk = Target(f"{step.tier[-3:]} desk", relay[step.tier])
        return [Wave(step.tier, ("relay",), (desk,), step.wait_s, relay=True)]
    people = tuple(
        Target(c["name"], c["phone"], c.get("relation"))
        for c in contacts
        if c.get("tier", "family") == step.tier
    )
    if not people:
        return []
    if step.targets == "all":
        return [Wave(step.tier, step.channels, people, step.wait_s)]
    if step.targets == "on_duty":
        # Until duty rosters exist, the subscriber's first community contact is on duty.
        return [Wave(step.tier, step.channels, people[:1], step.wait_s)]
    return [Wave(step.tier, step.channels, (p,), step.wait_s) for p in people]


DEFAULT_POLICIES: dict[str, dict[str, Any]] = {
    "alarm": {
        "name": "alarm",
        "kinds": ["sos", "fall"],
        "relay_deadline_s": 300,
        "night": {"from": 22, "to": 7},
        "steps": [
            {
                "tier": "family",
                "targets": "in_order",
                "channels": ["voice", "sms"],
                "wait_s": 60,
                "rounds": 2,
                "when": {"night": False},
            },
            {
                "tier": "community",
                "targets": "in_order",
                "channels": ["voice", "sms"],
                "wait_s": 90,
            },
            {
                "tier": "family",
                "targets": "in_order",
                "channels": ["voice", "sms"],
                "wait_s": 60,
                "when": {"night": True},
            },
            {"tier": "relay_120", "wait_s": 300},
            {"tier": "operator", "wait_s": 0},
        ],
    },
    "care_missed": {
        "name": "care_missed",
        "kinds": ["care_missed"],
        "steps": [
            {"tier": "family", "targets": "in_order", "channels": ["voice"], "wait_s": 120},
            {
                "tier": "community",
                "targets": "on_duty",
                "channels": ["voice", "sms"],
                "wait_s": 1800,
            },
            {"tier": "operator", "wait_s": 0},
        ],
    },
    "offline": {
        "name": "offline",
        "kinds": ["offline"],
        "steps": [
            {"tier": "family", "targets": "in_order", "channels": ["sms", "voice"], "wait_s": 1800},
            {"tier": "operator", "wait_s": 0},
        ],
    },
    "low_battery": {
        "name": "low_battery",
        "kinds": ["low_battery"],
        "steps": [{"tier": "family", "targets": "all", "channels": ["sms"], "wait_s": 3600}],
    },
}
