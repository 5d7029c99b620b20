"""Care-plan maths: validation, due times, quiet hours, pauses, Asia/Shanghai days, spreading.

``dispatch.routing.care_schedule`` is pure: it takes aware datetimes and returns
aware datetimes.  Times here are realistic (December 2026); Asia/Shanghai is
UTC+8 with no daylight saving, so local 09:00 is 01:00 UTC the same day and
local 07:00 is 23:00 UTC the day before.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from dispatch.routing import care_schedule as cs

SH = ZoneInfo("Asia/Shanghai")
# Friday 2026-12-04 00:00 UTC = 08:00 in Shanghai.
FRI = datetime(2026, 12, 4, 0, 0, tzinfo=UTC)
DAILY = cs.CarePlan(cadence_days=1)  # 09:00-11:00 Asia/Shanghai
WEEKLY = cs.CarePlan(cadence_days=7)
IDS = range(1, 2001)


def dues(plan: cs.CarePlan, sid: int, after: datetime, n: int) -> list[datetime]:
    """The next ``n`` due times of one subscriber, each strictly after the previous."""
    out = []
    for _ in range(n):
        after = cs.next_due(plan, sid, after)
        assert after is not None
        out.append(after)
    return out


def local(dt: datetime) -> datetime:
    return dt.astimezone(SH)


# --- parse_plan: refusals ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ({"window": ["11:00", "09:00"]}, "empty or inverted"),
        ({"window": ["09:00", "09:00"]}, "empty or inverted"),
        ({"timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"timezone": ""}, "unknown time zone"),
        ({"timezone": 8}, "unknown time zone"),
        ({"cadence_days": 0}, "cadence_days"),
        ({"cadence_days": 91}, "cadence_days"),
        ({"cadence_days": -7}, "cadence_days"),
        ({"cadence_days": "7"}, "cadence_days"),
        ({"cadence_days": True}, "cadence_days"),
        ({"quiet": [["09:00", "11:00"]]}, "quiet hours cover the whole window"),
        ({"quiet": [["08:00", "12:00"]]}, "quiet hours cover the whole window"),
        ({"quiet": [["09:00", "10:00"], ["10:00", "11:00"]]}, "quiet hours cover the whole window"),
        ({"quiet": [["10:30", "10:00"]]}, "quiet[0] is empty or inverted"),
        ({"quiet": [["09:10", "09:20"], ["10:00", "10:00"]]}, "quiet[1] is empty or inverted"),
        ({"pauses": [["2026-12-27", "2026-12-20"]]}, "pauses[0] ends before it starts"),
        ({"pauses": [["2026-12-20"]]}, "pauses[0] must be two ISO dates"),
        ({"pauses": [["2026-12-20", "next week"]]}, "pauses[0] must be two ISO dates"),
        ({"pauses": "2026-12-20"}, "pauses must be a list"),
        ({"window": ["9am", "11:00"]}, "window start must be HH:MM"),
        ({"window": ["09:00", "25:00"]}, "window end must be HH:MM"),
        ({"window": ["09:60", "11:00"]}, "window start must be HH:MM"),
        ({"window": ["0900", "11:00"]}, "window start must be HH:MM"),
        ({"window": ["09:00:00", "11:00"]}, "window start must be HH:MM"),
        ({"window": [900, "11:00"]}, "window start must be a string"),
        ({"window": ["09:00"]}, "window must be"),
        ({"quiet": [["09:30", "9h45"]]}, "quiet[0] end must be HH:MM"),
        ({"windows": ["09:00", "11:00"]}, "unknown fields ['windows']"),
        ({"cadence": 1}, "unknown fields ['cadence']"),
        ({"answer_window_s": 0}, "answer_window_s"),
        ({"retries": 6}, "retries"),
        ({"retry_spacing_s": 1}, "retry_spacing_s"),
    ],
)
def test_parse_plan_refuses_bad_documents_naming_the_problem(doc, words) -> None:
    """Each unusable plan document is refused with a CarePlanError whose message names it."""
    with pytest.raises(cs.CarePlanError) as err:
        cs.parse_plan(doc)
    assert words in str(err.value)


@pytest.mark.parametrize("doc", [None, [], "daily", 1])
def test_parse_plan_refuses_a_document_that_is_not_an_object(doc) -> None:
    """A plan that is not a JSON object is refused, not crashed on."""
    with pytest.raises(cs.CarePlanError, match="JSON object"):
        cs.parse_plan(doc)


def test_parse_plan_accepts_the_documented_example() -> None:
    """The example in docs/care.md parses to exactly the plan it describes."""
    plan = cs.parse_plan(
        {
            "cadence_days": 1,
            "window": ["09:00", "11:00"],
            "quiet": [["09:30", "09:45"]],
            "pauses": [["2026-12-20", "2026-12-27"]],
            "timezone": "Asia/Shanghai",
            "answer_window_s": 300,
            "retries": 2,
            "retry_spacing_s": 600,
        }
    )
    assert plan == cs.CarePlan(
        cadence_days=1,
        window_start=time(9, 0),
        window_end=time(11, 0),
        quiet=((time(9, 30), time(9, 45)),),
        pauses=((date(2026, 12, 20), date(2026, 12, 27)),),
        timezone="Asia/Shanghai",
        answer_window_s=300,
        retries=2,
        retry_spacing_s=600,
    )


def test_parse_plan_takes_missing_fields_from_the_base_plan() -> None:
    """Fields the document leaves out come from ``base``; the ones it names replace them."""
    base = cs.CarePlan(
        cadence_days=1,
        window_start=time(8, 0),
        window_end=time(10, 0),
        quiet=((time(8, 30), time(8, 45)),),
        pauses=((date(2026, 12, 20), date(2026, 12, 27)),),
        timezone="Asia/Urumqi",
        answer_window_s=90,
        retries=4,
        retry_spacing_s=120,
    )
    plan = cs.parse_plan({"answer_window_s": 60, "window": ["08:15", "10:00"]}, base)
    assert plan.answer_window_s == 60
    assert (plan.window_start, plan.window_end) == (time(8, 15), time(10, 0))
    assert plan.cadence_days == 1
    assert plan.quiet == base.quiet
    assert plan.pauses == base.pauses
    assert plan.timezone == "Asia/Urumqi"
    assert (plan.retries, plan.retry_spacing_s) == (4, 120)
    assert cs.parse_plan({}, base) == base
    assert cs.parse_plan({}) == cs.CarePlan()


def test_parse_plan_checks_the_document_against_its_base() -> None:
    """A window that the inherited quiet hours cover entirely is refused."""
    base = cs.CarePlan(quiet=((time(9, 0), time(10, 0)),))
    with pytest.raises(cs.CarePlanError, match="quiet hours cover the whole window"):
        cs.parse_plan({"window": ["09:15", "09:45"]}, base)
    with pytest.raises(cs.CarePlanError, match="empty or inverted"):
        cs.parse_plan({"window": ["12:00", "11:00"]}, base)


def test_an_empty_quiet_or_pause_list_clears_the_inherited_one() -> None:
    """``quiet: []`` and ``pauses: []`` replace the base's lists rather than keeping them."""
    base = cs.CarePlan(
        quiet=((time(9, 30), time(9, 45)),), pauses=((date(2026, 12, 20), date(2026, 12, 27)),)
    )
    plan = cs.parse_plan({"quiet": [], "pauses": []}, base)
    assert plan.quiet == () and plan.pauses == ()


def test_to_json_round_trips_through_parse_plan() -> None:
    """``parse_plan(plan.to_json())`` gives back an equal plan (quiet hours and pauses included)."""
    plan = cs.CarePlan(
        cadence_days=3,
        window_start=time(14, 0),
        window_end=time(17, 30),
        quiet=((time(15, 0), time(15, 30)), (time(16, 0), time(16, 15))),
        pauses=((date(2026, 12, 20), date(2026, 12, 27)), (date(2027, 2, 1), date(2027, 2, 1))),
        timezone="Asia/Shanghai",
        answer_window_s=120,
        retries=0,
        retry_spacing_s=60,
    )
    assert cs.parse_plan(plan.to_json()) == plan
    assert cs.parse_plan(cs.CarePlan().to_json()) == cs.CarePlan()
    assert plan.to_json()["window"] == ["14:00", "17:30"]


# --- default plans -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("situation", "cadence"),
    [("alone", 1), ("with_family", 7), ("with_spouse", 7), (None, 7), ("", 7)],
)
def test_default_plan_is_daily_for_living_alone_and_weekly_otherwise(situation, cadence) -> None:
    """Profile default: living alone → cadence 1 day, anyone else → 7 days, 09:00-11:00 local."""
    plan = cs.default_plan(situation)
    assert plan.cadence_days == cadence
    assert (plan.window_start, plan.window_end) == (time(9, 0), time(11, 0))
    assert plan.timezone == "Asia/Shanghai"


# --- next_due: daily cadence, window, quiet hours, pauses -----------------------------------


def test_daily_cadence_gives_one_due_per_local_day_inside_the_window() -> None:
    """A daily plan yields exactly one due per Shanghai day, always 09:00 <= local time < 11:00."""
    for sid in (1, 42, 299_999):
        got = dues(DAILY, sid, FRI, 30)
        days = [local(d).date() for d in got]
        assert days == [date(2026, 12, 4) + timedelta(days=n) for n in range(30)]
        for d in got:
            assert time(9, 0) <= local(d).time() < time(11, 0)
            assert d.tzinfo is not None


def test_a_subscriber_keeps_the_same_second_every_day() -> None:
    """The local wall-clock time of a subscriber's due is the same each day (its slot)."""
    got = dues(DAILY, 1234, FRI, 10)
    slot = cs.slot_seconds(DAILY, 1234)
    for d in got:
        t = local(d).time()
        assert t.hour * 3600 + t.minute * 60 + t.second == slot
    assert {b - a for a, b in zip(got, got[1:], strict=False)} == {timedelta(days=1)}


def test_slot_seconds_is_stable_and_inside_the_open_window() -> None:
    """``slot_seconds`` gives the same answer for the same id, and differs between ids."""
    slots = [cs.slot_seconds(DAILY, sid) for sid in IDS]
    assert slots == [cs.slot_seconds(DAILY, sid) for sid in IDS]
    assert all(9 * 3600 <= s < 11 * 3600 for s in slots)
    assert len(set(slots)) > len(slots) * 0.75


def test_due_times_never_fall_in_quiet_hours() -> None:
    """With quiet hours 09:30-09:45 and 10:00-10:30 no due time starts inside them."""
    plan = cs.parse_plan(
        {"cadence_days": 1, "quiet": [["09:30", "09:45"], ["10:00", "10:30"]]}, DAILY
    )
    quiet = [(time(9, 30), time(9, 45)), (time(10, 0), time(10, 30))]
    seen = Counter()
    for sid in IDS:
        t = local(cs.next_due(plan, sid, FRI)).time()
        assert time(9, 0) <= t < time(11, 0)
        assert not any(a <= t < b for a, b in quiet), (sid, t)
        seen[(t.hour, t.minute // 15)] += 1
    # The three open stretches (09:00-09:30, 09:45-10:00, 10:30-11:00) are all used.
    assert {(9, 0), (9, 1), (9, 3), (10, 2), (10, 3)} <= set(seen)


def test_quiet_hours_partly_outside_the_window_only_cut_the_overlap() -> None:
    """Quiet hours 08:00-09:30 on a 09:00-11:00 window leave 09:30-11:00 open."""
    plan = cs.parse_plan({"quiet": [["08:00", "09:30"]]}, DAILY)
    for sid in IDS:
        t = local(cs.next_due(plan, sid, FRI)).time()
        assert time(9, 30) <= t < time(11, 0)


def test_pause_dates_are_skipped_inclusive_at_both_ends() -> None:
    """A pause 2026-12-20..2026-12-27 removes exactly those local days from a daily plan."""
    plan = cs.parse_plan({"pauses": [["2026-12-20", "2026-12-27"]]}, DAILY)
    start = datetime(2026, 12, 15, 0, 0, tzinfo=UTC)
    days = [local(d).date() for d in dues(plan, 77, start, 14)]
    paused = {date(2026, 12, 20) + timedelta(days=n) for n in range(8)}
    expected = [
        date(2026, 12, 15) + timedelta(days=n)
        for n in range(22)
        if date(2026, 12, 15) + timedelta(days=n) not in paused
    ]
    assert days == expected
    assert date(2026, 12, 19) in days and date(2026, 12, 28) in days


def test_a_due_during_a_pause_moves_to_the_first_day_after_it() -> None:
    """Asked on the first paused day, the next due is on the day after the pause ends."""
    plan = cs.parse_plan({"pauses": [["2026-12-20", "2026-12-27"]]}, DAILY)
    after = datetime(2026, 12, 19, 16, 0, tzinfo=UTC)  # 00:00 local on the 20th
    due = cs.next_due(plan, 5, after)
    assert local(due).date() == date(2026, 12, 28)


def test_a_pause_longer_than_the_horizon_gives_no_due_time() -> None:
    """When every day within 400 days is paused, next_due returns None rather than looping."""
    plan = cs.parse_plan({"pauses": [["2026-01-01", "2028-12-31"]]}, DAILY)
    assert cs.next_due(plan, 5, FRI) is None


# --- next_due: strictly after ----------------------------------------------------------------


def test_a_due_time_is_always_strictly_after_after() -> None:
    """``next_due(after=due)`` is a later due (the next day), never the same instant."""
    for sid in (3, 4, 5):
        due = cs.next_due(DAILY, sid, FRI)
        assert due > FRI
        again = cs.next_due(DAILY, sid, due)
        assert again == due + timedelta(days=1)
        just_before = cs.next_due(DAILY, sid, due - timedelta(microseconds=1))
        assert just_before == due


def test_after_today_s_slot_the_next_due_is_tomorrow() -> None:
    """Asked at local noon, a daily subscriber's next due is tomorrow's slot."""
    noon = datetime(2026, 12, 4, 4, 0, tzinfo=UTC)  # 12:00 local
    due = cs.next_due(DAILY, 9, noon)
    assert local(due).date() == date(2026, 12, 5)


# --- next_due: day boundaries in Asia/Shanghai ---------------------------------------------


def test_day_boundary_after_local_midnight_is_the_next_local_day() -> None:
    """2026-12-04T16:30Z is 00:30 on the 5th in Shanghai: the next due is on the 5th local."""
    after = datetime(2026, 12, 4, 16, 30, tzinfo=UTC)
    for sid in IDS:
        due = cs.next_due(DAILY, sid, after)
        assert local(due).date() == date(2026, 12, 5)
        assert time(9, 0) <= local(due).time() < time(11, 0)
        # 09:00-11:00 local on the 5th is 01:00-03:00 UTC on the 5th.
        assert datetime(2026, 12, 5, 1, tzinfo=UTC) <= due < datetime(2026, 12, 5, 3, tzinfo=UTC)


def test_day_boundary_before_local_midnight_is_still_the_next_local_day() -> None:
    """2026-12-04T15:30Z is 23:30 on the 4th local: today's window is over, so the 5th."""
    after = datetime(2026, 12, 4, 15, 30, tzinfo=UTC)
    for sid in (1, 2, 3):
        assert local(cs.next_due(DAILY, sid, after)).date() == date(2026, 12, 5)


def test_evening_window_is_local_time_not_utc() -> None:
    """A 22:00-23:30 window is 14:00-15:30 UTC; at 00:30 local the due is tonight local."""
    plan = cs.parse_plan({"cadence_days": 1, "window": ["22:00", "23:30"]})
    after = datetime(2026, 12, 4, 16, 30, tzinfo=UTC)  # 00:30 local on the 5th
    for sid in IDS:
        due = cs.next_due(plan, sid, after)
        assert local(due).date() == date(2026, 12, 5)
        assert time(22, 0) <= local(due).time() < time(23, 30)
        assert (
            datetime(2026, 12, 5, 14, tzinfo=UTC) <= due < datetime(2026, 12, 5, 15, 30, tzinfo=UTC)
        )


def test_early_window_due_falls_on_the_previous_utc_date() -> None:
    """A 07:00-08:00 local window is 23:00-24:00 UTC the day before; the local day decides."""
    plan = cs.parse_plan({"cadence_days": 7, "window": ["07:00", "08:00"]})
    for sid in range(1, 200):
        got = dues(plan, sid, FRI, 4)
        weekdays = {local(d).weekday() for d in got}
        assert len(weekdays) == 1
        for d in got:
            assert d.astimezone(UTC).date() == local(d).date() - timedelta(days=1)
            assert time(7, 0) <= local(d).time() < time(8, 0)


# --- next_due: weekly cadence ----------------------------------------------------------------


def test_weekly_cadence_is_one_day_in_seven_on_the_same_weekday() -> None:
    """A weekly subscriber is due every 7 days exactly, on one fixed local weekday."""
    for sid in range(1, 300):
        got = dues(WEEKLY, sid, FRI, 8)
        assert {local(d).weekday() for d in got} == {local(got[0]).weekday()}
        assert {b - a for a, b in zip(got, got[1:], strict=False)} == {timedelta(days=7)}
        assert got[0] - FRI <= timedelta(days=7, hours=3)


def test_weekly_cadence_spreads_subscribers_over_the_week() -> None:
    """70,000 weekly subscribers fall on all seven weekdays, about a seventh on each."""
    per_day = Counter(
        cs.next_due(WEEKLY, sid, FRI).astimezone(SH).weekday() for sid in range(1, 70_001)
    )
    assert set(per_day) == set(range(7))
    assert all(9_000 <= n <= 11_000 for n in per_day.values()), per_day


def test_cadence_of_three_days_is_every_third_local_day() -> None:
    """cadence_days=3 yields dues exactly three days apart."""
    plan = cs.parse_plan({"cadence_days": 3})
    got = dues(plan, 11, FRI, 6)
    assert {b - a for a, b in zip(got, got[1:], strict=False)} == {timedelta(days=3)}


# --- spreading ------------------------------------------------------------------------------


def test_300000_daily_subscribers_are_spread_over_every_second_of_the_window() -> None:
    """300,000 daily 09:00-11:00 subscribers: at most 150 due in any one second, none idle."""
    after = datetime(2026, 12, 4, 16, 30, tzinfo=UTC)
    per_second = Counter(cs.next_due(DAILY, sid, after) for sid in range(1, 300_001))
    worst = max(per_second.values())
    print(f"largest number of care prompts due in one second: {worst} (mean {300_000 / 7200:.1f})")
    assert worst <= 150
    start = datetime(2026, 12, 5, 1, 0, tzinfo=UTC)
    assert set(per_second) == {start + timedelta(seconds=n) for n in range(7200)}
