"""Care-plan maths: when is each subscriber's next care check due?

Pure functions, no clock or store.  A plan is a cadence in days, a local time
window (e.g. 09:00-11:00 in Asia/Shanghai), quiet hours inside it, and pause
date ranges.  Subscribers are spread over the window (and, for weekly
cadences, over the week) by a hash of their id, so 300,000 subscribers are
never prompted in the same second and each keeps the same slot day after day.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DEFAULT_TZ = "Asia/Shanghai"
MAX_DAYS_AHEAD = 400


class CarePlanError(ValueError):
    """A care plan that cannot be used; the message names the problem."""


@dataclass(frozen=True)
class CarePlan:
    """When and how a subscriber is checked on."""

    cadence_days: int = 7
    window_start: time = time(9, 0)
    window_end: time = time(11, 0)
    quiet: tuple[tuple[time, time], ...] = ()
    pauses: tuple[tuple[date, date], ...] = ()
    timezone: str = DEFAULT_TZ
    answer_window_s: int = 300
    retries: int = 2
    retry_spacing_s: int = 600
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def to_json(self) -> dict[str, Any]:
        return {
            "cadence_days": self.cadence_days,
            "window": [self.window_start.strftime("%H:%M"), self.window_end.strftime("%H:%M")],
            "quiet": [[a.strftime("%H:%M"), b.strftime("%H:%M")] for a, b in self.quiet],
            "pauses": [[a.isoformat(), b.isoformat()] for a, b in self.pauses],
            "timezone": self.timezone,
            "answer_window_s": self.answer_window_s,
            "retries": self.retries,
            "retry_spacing_s": self.retry_spacing_s,
        }


def _hhmm(value: Any, where: str) -> time:
    if not isinstance(value, str):
        raise CarePlanError(f"{where} must be a string HH:MM")
    try:
        hours, minutes = value.split(":")
        return time(int(hours), int(minutes))
    except ValueError:
        raise CarePlanError(f"{where} must be HH:MM (00:00-23:59), got {value!r}") from None


def _int(doc: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = doc.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise CarePlanError(f"{key} must be an integer from {lo} to {hi}, got {value!r}")
    return value


def parse_plan(doc: Any, base: CarePlan | None = None) -> CarePlan:
    """Validate a care-plan document (fields missing from it come from ``base``)."""
    base = base or CarePlan()
    if not isinstance(doc, dict):
        raise CarePlanError("a care plan must be a JSON object")
    known = {
        "cadence_days",
        "window",
        "quiet",
        "pauses",
        "timezone",
        "answer_window_s",
        "retries",
        "retry_spacing_s",
    }
    unknown = set(doc) - known
    if unknown:
        raise CarePlanError(f"unknown fields {sorted(unknown)}; known: {sorted(known)}")
    tz = doc.get("timezone", base.timezone)
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise CarePlanError(f"unknown time zone {tz!r}") from None
    start, end = base.window_start, base.window_end
    if "window" in doc:
        w = doc["window"]
        if not isinstance(w, list) or len(w) != 2:
            raise CarePlanError('window must be ["HH:MM", "HH:MM"]')
        start, end = _hhmm(w[0], "window start"), _hhmm(w[1], "window end")
    if start >= end:
        raise CarePlanError(f"window {start:%H:%M}-{end:%H:%M} is empty or inverted")
    quiet = base.quiet
    if "quiet" in doc:
        if not isinstance(doc["quiet"], list):
            raise CarePlanError('quiet must be a list of ["HH:MM", "HH:MM"]')
        quiet = []
        for n, q in enumerate(doc["quiet"]):
            if not isinstance(q, list) or len(q) != 2:
                raise CarePlanError(f'quiet[{n}] must be ["HH:MM", "HH:MM"]')
            a, b = _hhmm(q[0], f"quiet[{n}] start"), _hhmm(q[1], f"quiet[{n}] end")
            if a >= b:
                raise CarePlanError(f"quiet[{n}] is empty or inverted")
            quiet.append((a, b))
        quiet = tuple(quiet)
    pauses = base.pauses
    if "pauses" in doc:
        if not isinstance(doc["pauses"], list):
            raise CarePlanError('pauses must be a list of ["YYYY-MM-DD", "YYYY-MM-DD"]')
        parsed = []
        for n, p in enumerate(doc["pauses"]):
            try:
                a, b = date.fromisoformat(p[0]), date.fromisoformat(p[1])
            except (TypeError, ValueError, IndexError, KeyError):
                raise CarePlanError(f"pauses[{n}] must be two ISO dates") from None
            if a > b:
                raise CarePlanError(f"pauses[{n}] ends before it starts")
            parsed.append((a, b))
        pauses = tuple(parsed)
    plan = CarePlan(
        cadence_days=_int(doc, "cadence_days", base.cadence_days, 1, 90),
        window_start=start,
        window_end=end,
        quiet=quiet,
        pauses=pauses,
        timezone=tz,
        answer_window_s=_int(doc, "answer_window_s", base.answer_window_s, 5, 3600),
        retries=_int(doc, "retries", base.retries, 0, 5),
        retry_spacing_s=_int(doc, "retry_spacing_s", base.retry_spacing_s, 5, 6 * 3600),
    )
    if not _open_intervals(plan):
        raise CarePlanError("quiet hours cover the whole window: no time left to call")
    return plan


def _seconds(t: time) -> int:
    return t.hour * 3600 + t.minute * 60 + t.second


def _open_intervals(plan: CarePlan) -> list[tuple[int, int]]:
    """Seconds-of-day intervals inside the window and outside quiet hours."""
    spans = [(_seconds(plan.window_start), _seconds(plan.window_end))]
    for qa, qb in plan.quiet:
        a, b = _seconds(qa), _seconds(qb)
        cut = []
        for s, e in spans:
            if b <= s or a >= e:
                cut.append((s, e))
                continue
            if s < a:
                cut.append((s, a))
            if b < e:
                cut.append((b, e))
        spans = cut
    return spans


def _hash(subscriber_id: int, salt: str) -> int:
    digest = hashlib.blake2b(f"{salt}:{subscriber_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def slot_seconds(plan: CarePlan, subscriber_id: int) -> int:
    """The subscriber's fixed second-of-day inside the open part of the window."""
    spans = _open_intervals(plan)
    total = sum(e - s for s, e in spans)
    offset = _hash(subscriber_id, "slot") % total
    for s, e in spans:
        if offset < e - s:
            return s + offset
        offset -= e - s
    raise AssertionError("unreachable")


def _paused(plan: CarePlan, day: date) -> bool:
    return any(a <= day <= b for a, b in plan.pauses)


def _on_cadence(plan: CarePlan, subscriber_id: int, day: date) -> bool:
    phase = _hash(subscriber_id, "day") % plan.cadence_days
    return (day.toordinal() - phase) % plan.cadence_days == 0


def next_due(plan: CarePlan, subscriber_id: int, after: datetime) -> datetime | None:
    """The first due time strictly after ``after`` (aware), or None within 400 days."""
    tz = plan.tz
    local = after.astimezone(tz)
    slot = slot_seconds(plan, subscriber_id)
    day = local.date()
    for _ in range(MAX_DAYS_AHEAD):
        if _on_cadence(plan, subscriber_id, day) and not _paused(plan, day):
            # A slot is wall-clock time in the plan's zone, whatever the offset that day.
            due = datetime.combine(day, time(slot // 3600, slot % 3600 // 60, slot % 60), tz)
            if due > after:
                return due
        day += timedelta(days=1)
    return None


def default_plan(living_situation: str | None) -> CarePlan:
    """Profile defaults: living alone → daily, everyone else → weekly."""
    return CarePlan(cadence_days=1 if living_situation == "alone" else 7)
