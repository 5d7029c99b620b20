"""The care scheduler on a fake clock: planning, prompts, answers, misses, restarts, silence.

Storage is a real SQLite file behind :class:`tests.unit.fakes.SyncDatabase`, whose
Deferreds have already fired, so scheduler coroutines complete synchronously.
Time is a :class:`twisted.internet.task.Clock` set to Friday 2026-12-04 00:00 UTC,
08:00 in Asia/Shanghai (UTC+8, no daylight saving): an hour before the default
09:00-11:00 care window.  The gateway is a stub holding link stubs that record
the commands sent to them; the escalation engine is a stub recording which
incidents it was told about; voice calls go to the engine tests' FakeChannel.
The district's plan answers within 120 s and retries twice, 600 s apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select, update
from twisted.internet import task

from dispatch import events as ev
from dispatch.gateway import Gateway
from dispatch.livestate import LiveState
from dispatch.protocol.base import Inbound
from dispatch.routing import care_schedule as cs
from dispatch.routing.care import CareConfig, CareScheduler
from dispatch.store import care as repo
from dispatch.store import subscribers as subscriber_repo
from dispatch.store.devices import DeviceInfo
from dispatch.store.errors import Conflict, NotFound
from dispatch.store.models import CareRound, Device, Incident, TimelineEntry
from tests.unit.fakes import DISTRICT, SyncDatabase, subscriber_body
from tests.unit.test_engine import FakeChannel, result_of, run

SH = ZoneInfo("Asia/Shanghai")
T0 = 1_796_342_400  # 2026-12-04 00:00 UTC = Friday 08:00 Asia/Shanghai
OTHER_DISTRICT = "瓯海区"
FAST = {"answer_window_s": 120, "retries": 2, "retry_spacing_s": 600}
CONFIG = CareConfig(offline_after_s=7200, inactivity_days=7)


# --- doubles --------------------------------------------------------------------------------


class LinkStub:
    """A terminal link: records every command; ``accepts`` is what send_command returns."""

    def __init__(self, protocol: str = "native", accepts: bool = True) -> None:
        self.protocol = protocol
        self.accepts = accepts
        self.peer = "10.0.0.7:40001"
        self.device: DeviceInfo | None = None
        self.commands: list[Any] = []
        self.closed: str | None = None

    def send_command(self, command: Any) -> bool:
        self.commands.append(command)
        return self.accepts

    def close(self, reason: str) -> None:
        self.closed = reason

    def prompts(self) -> list[ev.CarePrompt]:
        return [c for c in self.commands if isinstance(c, ev.CarePrompt)]


class GatewayStub:
    """What the scheduler reads from the gateway: the links by device ident."""

    def __init__(self) -> None:
        self.links: dict[str, LinkStub] = {}


class EngineStub:
    """Records the incidents the scheduler hands to the escalation engine."""

    def __init__(self) -> None:
        self.opened: list[int] = []

    def incident_opened(self, incident_id: int) -> None:
        self.opened.append(incident_id)


class World:
    """A clock, a database, a gateway stub, a channel, an engine stub and a scheduler."""

    def __init__(self, url: str, start: float = T0, config: CareConfig = CONFIG) -> None:
        self.url = url
        self.config = config
        self.clock = task.Clock()
        self.clock.advance(start)
        self.dbs = [SyncDatabase(url)]
        self.db = self.dbs[0]
        self.gateway = GatewayStub()
        self.channel = FakeChannel()
        self.engine = EngineStub()
        self.sched = self._new()
        self._phones = iter(range(13_700_000_001, 13_800_000_000))
        self.db.write(repo.save_plan, "district", DISTRICT, FAST, "admin", self.now())
        self.db.write(repo.save_plan, "district", OTHER_DISTRICT, FAST, "admin", self.now())

    def _new(self) -> CareScheduler:
        return CareScheduler(
            self.clock,
            self.db,
            self.gateway,
            self.channel,
            self.engine,
            callback_base="http://cb",
            config=self.config,
        )

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), UTC)

    def restart(self) -> None:
        """Stop the scheduler; start a new one (new connection, gateway, channel, engine)."""
        self.sched.stop()
        self.db = SyncDatabase(self.url)
        self.dbs.append(self.db)
        self.gateway = GatewayStub()
        self.channel = FakeChannel()
        self.engine = EngineStub()
        self.sched = self._new()
        self.sched.start()

    # --- seeding

    def enrol(
        self,
        ident: str,
        *,
        protocol: str = "native",
        alone: bool = True,
        district: str = DISTRICT,
        phone: str | None = "auto",
        device: bool = True,
        age_days: float = 30,
    ) -> int:
        """An active subscriber (enrolled ``age_days`` ago) with a phone and a terminal."""
        body = subscriber_body(ident, protocol=protocol, district=district)
        body["phone"] = str(next(self._phones)) if phone == "auto" else phone
        body["living_situation"] = "alone" if alone else "with_family"
        if not device:
            del body["device"]
        with self.db.session_sync() as s, s.begin():
            return subscriber_repo.create_subscriber(s, body, self.now() - timedelta(days=age_days))

    def link(self, ident: str, protocol: str = "native", accepts: bool = True) -> LinkStub:
        """The terminal is online on a link of ``protocol``."""
        self.gateway.links[ident] = link = LinkStub(protocol, accepts)
        return link

    def device(self, ident: str) -> Device:
        return self.db.query(lambda s: s.scalar(select(Device).where(Device.ident == ident)))

    def set_device(self, ident: str, **values: Any) -> None:
        with self.db.session_sync() as s, s.begin():
            s.execute(update(Device).where(Device.ident == ident).values(**values))

    # --- reading

    def rounds(self, sid: int | None = None) -> list[CareRound]:
        q = select(CareRound).order_by(CareRound.id)
        if sid is not None:
            q = q.where(CareRound.subscriber_id == sid)
        return list(self.db.query(lambda s: s.scalars(q).all()))

    def round(self, round_id: int) -> CareRound:
        return self.db.query(lambda s: s.get(CareRound, round_id))

    def incidents(self, kind: str | None = None) -> list[Incident]:
        q = select(Incident).order_by(Incident.id)
        if kind is not None:
            q = q.where(Incident.kind == kind)
        return list(self.db.query(lambda s: s.scalars(q).all()))

    def actions(self, incident_id: int) -> list[str]:
        return list(
            self.db.query(
                lambda s: s.scalars(
                    select(TimelineEntry.action)
                    .where(TimelineEntry.incident_id == incident_id)
                    .order_by(TimelineEntry.id)
                ).all()
            )
        )

    # --- acting

    def check(self, sid: int) -> int:
        """An operator's check now; the prompt goes out (timer due now)."""
        round_id = run(self.sched.check_now(sid))
        self.clock.advance(0)
        return round_id

    def answer(self, ident: str, round_id: int, answer: ev.CareAnswer) -> None:
        """The terminal ``ident`` answers ``round_id`` (through the gateway listener)."""
        dev = self.device(ident)
        info = DeviceInfo(dev.id, ident, dev.protocol, dev.subscriber_id, ())
        self.sched.terminal_answer(ev.CareCheckAnswer(ident, round_id, answer), info)

    def reach(self, at: datetime) -> None:
        """Advance to ``at`` the way the refill loop would: refill shortly before, then on."""
        self.clock.advance(max(0.0, at.timestamp() - self.clock.seconds() - 30))
        run(self.sched.refill())
        self.clock.advance(max(0.0, at.timestamp() - self.clock.seconds()))

    def next_timer(self) -> None:
        """Advance exactly to the next pending timer (the loops' or a round's) and run it."""
        at = min(call.getTime() for call in self.clock.getDelayedCalls())
        self.clock.advance(at - self.clock.seconds())

    def pump(self, seconds: int, step: int = 10) -> None:
        """Let ``seconds`` pass in small steps (so looping jobs run as they would)."""
        self.clock.pump([step] * (seconds // step))


@pytest.fixture
def world(sqlite_url: str) -> Iterator[World]:
    w = World(sqlite_url)
    yield w
    w.sched.stop()
    for db in w.dbs:
        db.stop()


def fast_plan(living: str = "alone") -> cs.CarePlan:
    return cs.parse_plan(FAST, cs.default_plan(living))


def local(dt: datetime) -> datetime:
    return dt.astimezone(SH)


# --- planning --------------------------------------------------------------------------------


def test_plan_missing_plans_one_round_per_active_subscriber_with_a_device(world: World) -> None:
    """Active subscribers with a terminal get one scheduled round each; others and reruns none."""
    alone = world.enrol("860000000000001", alone=True)
    family = world.enrol("860000000000002", protocol="gt06", alone=False)
    gone = world.enrol("860000000000003")
    no_device = world.enrol("860000000000004", device=False)
    with world.db.session_sync() as s, s.begin():
        subscriber_repo.deregister_subscriber(s, gone, "moved away", world.now())

    assert run(world.sched.plan_missing()) == 2

    [a] = world.rounds(alone)
    [f] = world.rounds(family)
    assert world.rounds(gone) == [] and world.rounds(no_device) == []
    assert (a.status, a.reason, a.attempts, a.district) == ("scheduled", "schedule", 0, DISTRICT)
    assert a.due_at == cs.next_due(fast_plan("alone"), alone, world.now())
    assert a.next_action_at == a.due_at
    assert local(a.due_at).date() == date(2026, 12, 4)  # daily: today, the window is ahead
    assert time(9) <= local(a.due_at).time() < time(11)
    assert f.due_at == cs.next_due(fast_plan("with_family"), family, world.now())
    assert a.params == FAST and f.params == FAST

    assert run(world.sched.plan_missing()) == 0
    assert len(world.rounds()) == 2


def test_a_subscriber_plan_document_overrides_the_district_one(world: World) -> None:
    """A subscriber's plan (here a 14:00-15:00 window) is used for that subscriber's round."""
    sid = world.enrol("860000000000001")
    world.db.write(
        repo.save_plan, "subscriber", sid, {"window": ["14:00", "15:00"]}, "admin", world.now()
    )
    run(world.sched.plan_missing())
    [r] = world.rounds(sid)
    assert time(14) <= local(r.due_at).time() < time(15)
    assert r.params == FAST


# --- prompting --------------------------------------------------------------------------------


def test_check_now_prompts_an_online_native_terminal(world: World) -> None:
    """An online native terminal gets a CarePrompt with the plan's answer window, via terminal."""
    sid = world.enrol("860000000000001")
    link = world.link("860000000000001")
    rid = world.check(sid)

    assert link.commands == [ev.CarePrompt(rid, pattern=3, window_s=120)]
    r = world.round(rid)
    assert (r.status, r.channel, r.attempts, r.reason, r.late) == (
        "prompted",
        "terminal",
        1,
        "manual",
        False,
    )
    assert r.prompted_at == world.now()
    assert r.next_action_at == world.now() + timedelta(seconds=120)
    assert world.channel.requests == []


def test_offline_terminal_gets_a_voice_call_to_the_subscriber(world: World) -> None:
    """With no link the round is a care-tier voice CallRequest to the subscriber's own phone."""
    sid = world.enrol("860000000000001", phone="13711112222")
    rid = world.check(sid)

    r = world.round(rid)
    assert (r.status, r.channel) == ("prompted", "voice")
    [call] = world.channel.requests
    assert (call.type, call.tier, call.channel) == ("call", "care", "voice")
    assert call.phone == "13711112222"
    assert call.relation == "self"
    assert call.incident_kind == "care_check"
    assert call.attempt_id == f"care-{r.callback_token}"
    assert call.callback_url == f"http://cb/api/v1/callbacks/care-{r.callback_token}"
    assert call.expires_at == (world.now() + timedelta(seconds=120)).isoformat()
    assert call.subscriber["id"] == sid and call.subscriber["district"] == DISTRICT


@pytest.mark.parametrize("protocol", ["gt06", "jt808"])
def test_a_terminal_that_cannot_be_prompted_gets_a_voice_call(world: World, protocol) -> None:
    """An online GT06 / JT/T 808 link is never sent a prompt: the round goes by voice."""
    sid = world.enrol("860000000000001", protocol=protocol)
    link = world.link("860000000000001", protocol=protocol)
    rid = world.check(sid)
    assert link.commands == []
    assert world.round(rid).channel == "voice"
    assert [r.tier for r in world.channel.requests] == ["care"]


def test_a_native_link_that_refuses_the_prompt_falls_back_to_voice(world: World) -> None:
    """If send_command returns False the round is put to the subscriber by voice instead."""
    sid = world.enrol("860000000000001")
    link = world.link("860000000000001", accepts=False)
    rid = world.check(sid)
    assert len(link.prompts()) == 1
    assert world.round(rid).channel == "voice"
    assert len(world.channel.requests) == 1


def test_a_subscriber_without_phone_or_terminal_is_retried_then_missed(world: World) -> None:
    """No link and no phone: no call is made; the round still expires, retries and is missed."""
    sid = world.enrol("860000000000001", phone=None)
    rid = world.check(sid)
    assert world.channel.requests == []
    world.pump(120 + 600 + 120 + 600 + 120)
    r = world.round(rid)
    assert (r.status, r.attempts) == ("missed", 3)
    assert world.engine.opened == [r.incident_id]


def test_a_scheduled_round_is_prompted_at_its_due_second(world: World) -> None:
    """The planned round is prompted exactly at due_at, not before, and not marked late."""
    sid = world.enrol("860000000000001")
    link = world.link("860000000000001")
    run(world.sched.plan_missing())
    [r] = world.rounds(sid)
    world.reach(r.due_at - timedelta(seconds=1))
    assert link.prompts() == []
    world.clock.advance(1)
    assert link.prompts() == [ev.CarePrompt(r.id, 3, 120)]
    r = world.round(r.id)
    assert (r.status, r.prompted_at, r.late) == ("prompted", r.due_at, False)


# --- answers ----------------------------------------------------------------------------------


def test_ok_answer_closes_the_round_and_plans_the_next_one(world: World) -> None:
    """OK → answered/ok, nothing escalated, and tomorrow's round is planned at the same slot."""
    ident = "860000000000001"
    sid = world.enrol(ident)
    world.link(ident)
    run(world.sched.plan_missing())
    [first] = world.rounds(sid)
    world.reach(first.due_at)
    world.clock.advance(30)
    world.answer(ident, first.id, ev.CareAnswer.OK)

    done = world.round(first.id)
    assert (done.status, done.answer, done.channel) == ("answered", "ok", "terminal")
    assert done.answered_at == world.now()
    assert done.incident_id is None
    assert world.engine.opened == [] and world.incidents() == []
    [_, nxt] = world.rounds(sid)
    assert (nxt.status, nxt.reason) == ("scheduled", "schedule")
    assert nxt.due_at == first.due_at + timedelta(days=1)


def test_help_answer_opens_an_sos_incident_and_tells_the_engine(world: World) -> None:
    """HELP → answered/help, an SOS incident with a care_help timeline entry, engine started."""
    ident = "860000000000001"
    sid = world.enrol(ident)
    world.link(ident)
    rid = world.check(sid)
    world.clock.advance(20)
    world.answer(ident, rid, ev.CareAnswer.HELP)

    r = world.round(rid)
    assert (r.status, r.answer) == ("answered", "help")
    [inc] = world.incidents()
    assert (inc.kind, inc.priority, inc.subscriber_id, inc.status) == ("sos", 1, sid, "open")
    assert inc.device_ident == ident
    assert r.incident_id == inc.id
    assert world.actions(inc.id) == ["care_help"]
    assert world.engine.opened == [inc.id]


def test_no_input_is_judged_as_an_expired_window_at_once(world: World) -> None:
    """NO_INPUT does not wait out the window: the round goes to its retry (spacing later) now."""
    ident = "860000000000001"
    sid = world.enrol(ident)
    link = world.link(ident)
    rid = world.check(sid)
    world.clock.advance(30)
    world.answer(ident, rid, ev.CareAnswer.NO_INPUT)
    world.clock.advance(0)

    r = world.round(rid)
    assert (r.status, r.attempts, r.answer) == ("scheduled", 1, None)
    assert r.next_action_at == world.now() + timedelta(seconds=600)
    world.clock.advance(599)
    assert len(link.prompts()) == 1
    world.clock.advance(1)
    assert link.prompts() == [ev.CarePrompt(rid, 3, 120)] * 2
    assert world.round(rid).attempts == 2
    assert world.engine.opened == []


def test_unanswered_round_retries_then_opens_care_missed(world: World) -> None:
    """No answer: retried twice 600 s after each 120 s window, then missed with a care_missed."""
    ident = "860000000000001"
    sid = world.enrol(ident)
    link = world.link(ident)
    rid = world.check(sid)
    start = world.now()

    world.clock.advance(120)
    r = world.round(rid)
    assert (r.status, r.attempts) == ("scheduled", 1)
    assert r.next_action_at == start + timedelta(seconds=720)
    world.clock.advance(599)
    assert len(link.prompts()) == 1
    world.clock.advance(1)
    assert len(link.prompts()) == 2
    assert world.round(rid).attempts == 2
    world.clock.advance(120)
    world.clock.advance(600)
    assert len(link.prompts()) == 3
    assert world.incidents() == []
    world.clock.advance(119)
    assert world.round(rid).status == "prompted"
    world.clock.advance(1)

    r = world.round(rid)
    assert (r.status, r.attempts, r.answer) == ("missed", 3, None)
    [inc] = world.incidents()
    assert (inc.kind, inc.priority, inc.subscriber_id) == ("care_missed", 2, sid)
    assert r.incident_id == inc.id
    assert world.actions(inc.id) == ["care_missed"]
    assert world.engine.opened == [inc.id]
    assert [p.round_id for p in link.prompts()] == [rid] * 3
    # The next round is planned once this one is over.
    assert [x.status for x in world.rounds(sid)] == ["missed", "scheduled"]


def test_answer_for_an_unknown_round_is_ignored(world: World) -> None:
    """A CARE_ANSWER naming a round that does not exist changes nothing and raises nothing."""
    ident = "860000000000001"
    sid = world.enrol(ident)
    world.link(ident)
    rid = world.check(sid)
    world.answer(ident, rid + 999, ev.CareAnswer.HELP)
    world.clock.advance(0)
    assert world.round(rid).status == "prompted"
    assert world.incidents() == [] and world.engine.opened == []


def test_answer_for_a_closed_round_is_ignored(world: World) -> None:
    """A HELP after the round was answered OK neither reopens it nor opens an incident."""
    ident = "860000000000001"
    sid = world.enrol(ident)
    world.link(ident)
    rid = world.check(sid)
    world.answer(ident, rid, ev.CareAnswer.OK)
    world.answer(ident, rid, ev.CareAnswer.HELP)
    world.answer(ident, rid, ev.CareAnswer.NO_INPUT)
    world.clock.advance(0)
    r = world.round(rid)
    assert (r.status, r.answer) == ("answered", "ok")
    assert world.incidents() == [] and world.engine.opened == []


def test_answer_from_another_subscribers_terminal_is_ignored(world: World) -> None:
    """A terminal cannot answer a round that belongs to a different subscriber."""
    sid = world.enrol("860000000000001")
    world.enrol("860000000000002")
    world.link("860000000000001")
    rid = world.check(sid)
    world.answer("860000000000002", rid, ev.CareAnswer.OK)
    assert world.round(rid).status == "prompted"


@pytest.mark.parametrize(
    ("answer", "result"), [("accept", "ok"), ("ok", "ok"), ("decline", "help")]
)
def test_voice_callback_answers_the_round(world: World, answer: str, result: str) -> None:
    """The care call's callback (accept/ok → ok, decline → help) closes the round by its token."""
    sid = world.enrol("860000000000001")
    rid = world.check(sid)
    token = world.round(rid).callback_token
    out = run(world.sched.callback_answer(token, answer))
    assert (out["round_id"], out["result"]) == (rid, result)
    r = world.round(rid)
    assert (r.status, r.answer, r.channel) == ("answered", result, "voice")
    assert world.engine.opened == ([r.incident_id] if result == "help" else [])


def test_voice_callback_with_unknown_token_raises_not_found(world: World) -> None:
    """An unknown care token raises NotFound (the API's 404), leaving rounds untouched."""
    sid = world.enrol("860000000000001")
    rid = world.check(sid)
    with pytest.raises(NotFound):
        run(world.sched.callback_answer("0" * 24, "accept"))
    assert world.round(rid).status == "prompted"


def test_voice_callback_for_a_closed_round_raises_conflict(world: World) -> None:
    """A second callback for an answered round raises Conflict (the API's 409); answer kept."""
    sid = world.enrol("860000000000001")
    rid = world.check(sid)
    token = world.round(rid).callback_token
    run(world.sched.callback_answer(token, "accept"))
    with pytest.raises(Conflict):
        run(world.sched.callback_answer(token, "decline"))
    assert world.round(rid).answer == "ok"
    assert world.incidents() == []


# --- durability ---------------------------------------------------------------------------------


def test_restart_retries_a_round_whose_window_expired_while_down(world: World) -> None:
    """Stopped while prompted, restarted after the window: retried exactly once more, not lost."""
    ident = "860000000000001"
    sid = world.enrol(ident)
    old = world.link(ident)
    rid = world.check(sid)
    world.sched.stop()
    world.clock.advance(1800)
    assert len(old.prompts()) == 1 and world.round(rid).status == "prompted"

    world.restart()
    new = world.link(ident)
    world.pump(10)  # the retry was due at +720, during the downtime: it goes out at once

    r = world.round(rid)
    assert (r.status, r.attempts) == ("prompted", 2)
    assert new.prompts() == [ev.CarePrompt(rid, 3, 120)]
    assert len(old.prompts()) == 1
    assert [x.id for x in world.rounds(sid)] == [rid]  # nothing new planned meanwhile


def test_restart_marks_late_a_round_whose_window_expired_while_down(world: World) -> None:
    """A round whose answer window ran out while down is marked late, and stays so on retry."""
    ident = "860000000000001"
    sid = world.enrol(ident)
    world.link(ident)
    rid = world.check(sid)
    world.sched.stop()
    world.clock.advance(1800)  # window ended at +120, the retry was due at +720

    world.restart()
    new = world.link(ident)
    world.clock.advance(0)
    assert world.round(rid).late is True
    world.pump(600 + 10)
    assert len(new.prompts()) == 1
    assert world.round(rid).late is True


def test_restart_prompts_at_once_a_retry_that_came_due_while_down(world: World) -> None:
    """A retry that fell due while the server was down is prompted as soon as it starts."""
    ident = "860000000000001"
    sid = world.enrol(ident)
    world.link(ident)
    rid = world.check(sid)
    world.sched.stop()
    world.clock.advance(1800)

    world.restart()
    new = world.link(ident)
    world.clock.advance(0)
    assert new.prompts() == [ev.CarePrompt(rid, 3, 120)]
    assert world.round(rid).attempts == 2


def test_restart_prompts_late_a_retry_that_was_waiting(world: World) -> None:
    """Stopped between retries, restarted after the retry time: prompted at once, marked late."""
    ident = "860000000000001"
    sid = world.enrol(ident)
    world.link(ident)
    rid = world.check(sid)
    world.clock.advance(120)
    assert world.round(rid).status == "scheduled"
    world.sched.stop()
    world.clock.advance(1800)

    world.restart()
    new = world.link(ident)
    world.clock.advance(0)
    r = world.round(rid)
    assert new.prompts() == [ev.CarePrompt(rid, 3, 120)]
    assert (r.status, r.attempts, r.late) == ("prompted", 2, True)
    assert r.prompted_at == world.now()


def test_restart_prompts_late_a_round_that_came_due_while_down(world: World) -> None:
    """A planned round whose due time passed while down is prompted on start, marked late."""
    ident = "860000000000001"
    sid = world.enrol(ident)
    world.sched.start()
    [r] = world.rounds(sid)
    world.sched.stop()
    world.clock.advance(r.due_at.timestamp() - world.clock.seconds() + 900)

    world.restart()
    link = world.link(ident)
    world.clock.advance(0)
    got = world.round(r.id)
    assert (got.status, got.attempts, got.late) == ("prompted", 1, True)
    assert got.prompted_at == world.now()
    assert link.prompts() == [ev.CarePrompt(r.id, 3, 120)]
    world.pump(60)
    assert len(link.prompts()) == 1 and world.channel.requests == []
    assert len(world.rounds(sid)) == 1


def test_restart_does_not_reprompt_an_answered_round(world: World) -> None:
    """An answered round stays answered across a restart and is never prompted again."""
    ident = "860000000000001"
    sid = world.enrol(ident)
    world.link(ident)
    rid = world.check(sid)
    world.answer(ident, rid, ev.CareAnswer.OK)
    world.sched.stop()
    world.clock.advance(600)

    world.restart()
    new = world.link(ident)
    world.pump(600)
    assert rid not in [p.round_id for p in new.prompts()]
    assert world.round(rid).status == "answered"


def test_stop_cancels_every_timer(world: World) -> None:
    """After stop() nothing the scheduler set up fires any more."""
    ident = "860000000000001"
    sid = world.enrol(ident)
    link = world.link(ident)
    world.sched.start()
    world.check(sid)
    world.sched.stop()
    assert world.clock.getDelayedCalls() == []
    world.clock.advance(86_400)
    assert len(link.prompts()) == 1


# --- silence detection --------------------------------------------------------------------------


def test_detect_silence_opens_one_offline_incident_per_silent_device(world: World) -> None:
    """Offline and unseen for over offline_after_s → one offline incident, not one per run."""
    silent = world.enrol("860000000000001")
    world.enrol("860000000000002")
    world.enrol("860000000000003")
    now = world.now()
    world.set_device("860000000000001", online=False, last_seen=now - timedelta(hours=3))
    world.set_device("860000000000002", online=False, last_seen=now - timedelta(hours=1))
    world.set_device("860000000000003", online=True, last_seen=now - timedelta(hours=3))

    run(world.sched.detect_silence())
    [inc] = world.incidents()
    assert (inc.kind, inc.priority, inc.subscriber_id) == ("offline", 3, silent)
    assert inc.device_ident == "860000000000001"
    assert world.actions(inc.id) == ["offline"]
    assert world.engine.opened == [inc.id]

    world.clock.advance(60)
    run(world.sched.detect_silence())
    assert len(world.incidents()) == 1
    assert world.engine.opened == [inc.id]


def test_detect_silence_runs_on_its_loop(world: World) -> None:
    """Once started, silence detection runs every silence_every_s without being called."""
    world.enrol("860000000000001")
    world.set_device(
        "860000000000001", online=False, last_seen=world.now() - timedelta(seconds=7000)
    )
    world.sched.start()
    assert world.incidents("offline") == []
    world.pump(300, step=60)
    assert len(world.incidents("offline")) == 1


def test_battery_low_opens_one_incident_until_it_is_resolved(world: World) -> None:
    """battery_low opens a low_battery incident once; again only after that one is resolved."""
    ident = "860000000000001"
    sid = world.enrol(ident)
    world.sched.battery_low(ident, 15)
    world.sched.battery_low(ident, 12)
    [inc] = world.incidents()
    assert (inc.kind, inc.priority, inc.subscriber_id) == ("low_battery", 4, sid)
    assert world.engine.opened == [inc.id]

    with world.db.session_sync() as s, s.begin():
        s.execute(update(Incident).where(Incident.id == inc.id).values(status="resolved"))
    world.sched.battery_low(ident, 9)
    assert [i.kind for i in world.incidents()] == ["low_battery", "low_battery"]
    assert world.engine.opened == [inc.id, world.incidents()[1].id]


def test_battery_low_for_an_unknown_device_is_ignored(world: World) -> None:
    """A battery report for an ident bound to nobody opens nothing and raises nothing."""
    world.sched.battery_low("869999999999999", 5)
    assert world.incidents() == [] and world.engine.opened == []


def _logged_in_gateway(world: World, ident: str) -> tuple[Gateway, LinkStub, list]:
    gateway = Gateway(world.clock, world.db, LiveState(180), low_battery=20)
    calls: list[tuple[str, int]] = []
    gateway.battery_listeners.append(lambda i, b: calls.append((i, b)))
    gateway.battery_listeners.append(world.sched.battery_low)
    link = LinkStub()
    outcome = result_of(gateway.handle(link, Inbound(ev.Login(ident))))
    assert outcome.ok and link.device is not None
    return gateway, link, calls


def test_gateway_battery_listener_fires_once_per_crossing(world: World) -> None:
    """Heartbeats 80, 20, 19, 15, 10, ?, 12, 25, 18: the listener fires for 19 and for 18 only."""
    ident = "860000000000001"
    world.enrol(ident)
    gateway, link, calls = _logged_in_gateway(world, ident)
    for battery in (80, 20, 19, 15, 10, None, 12, 25, 18):
        gateway.handle(link, Inbound(ev.Heartbeat(ident, battery=battery)))
        world.clock.advance(60)
    assert calls == [(ident, 19), (ident, 18)]
    # The second crossing finds the first low_battery incident still open: no second one.
    [inc] = world.incidents()
    assert inc.kind == "low_battery"
    assert world.engine.opened == [inc.id]


def test_gateway_battery_crossing_reported_in_an_sos_frame_fires_the_listener(world) -> None:
    """A battery that falls below the threshold in an SOS frame counts as a crossing."""
    ident = "860000000000001"
    world.enrol(ident)
    gateway, link, calls = _logged_in_gateway(world, ident)
    gateway.handle(link, Inbound(ev.Heartbeat(ident, battery=80)))
    result_of(gateway.handle(link, Inbound(ev.Sos(ident, seq=7, battery=15))))
    gateway.handle(link, Inbound(ev.Heartbeat(ident, battery=14)))
    assert len(calls) == 1


# --- inactivity ---------------------------------------------------------------------------------


def missed_round(sid: int, due: datetime) -> dict[str, Any]:
    """A past round the subscriber did not answer (inactivity needs one: they were asked)."""
    return {
        "subscriber_id": sid,
        "district": DISTRICT,
        "reason": "schedule",
        "due_at": due,
        "params": FAST,
        "status": "missed",
    }


def test_inactivity_needs_a_missed_round(world: World) -> None:
    """Nobody is called for inactivity who was never asked (no burst right after deployment)."""
    sid = world.enrol("860000000000001")
    run(world.sched.detect_inactivity())
    assert world.rounds(sid) == []


def test_detect_inactivity_checks_a_quiet_subscriber_once(world: World) -> None:
    """Missed a round, no answer, no SOS for 7 days → one check round now, not every hour."""
    quiet = world.enrol("860000000000001")
    answered = world.enrol("860000000000002")
    pressed = world.enrol("860000000000003")
    newcomer = world.enrol("860000000000004", age_days=3)
    now = world.now()
    world.db.write(
        repo.insert_rounds,
        [
            {
                "subscriber_id": answered,
                "district": DISTRICT,
                "reason": "schedule",
                "due_at": now - timedelta(days=2),
                "params": FAST,
                "status": "answered",
                "answer": "ok",
                "answered_at": now - timedelta(days=2),
            }
        ],
    )
    world.db.write(repo.open_incident, "sos", pressed, now - timedelta(days=1), {})
    world.db.write(repo.insert_rounds, [missed_round(quiet, now - timedelta(days=3))])

    run(world.sched.detect_inactivity())
    world.clock.advance(0)
    [r] = [x for x in world.rounds(quiet) if x.reason == "inactivity"]
    assert (r.reason, r.status, r.due_at) == ("inactivity", "prompted", now)
    assert world.rounds(pressed) == [] and world.rounds(newcomer) == []
    assert [x.reason for x in world.rounds(answered)] == ["schedule"]

    world.pump(3600)
    run(world.sched.detect_inactivity())
    assert [x.reason for x in world.rounds(quiet)].count("inactivity") == 1
    assert sum(x.reason == "inactivity" for x in world.rounds()) == 1


def test_start_runs_inactivity_detection_hourly(sqlite_url: str) -> None:
    """Once started, the scheduler checks on an inactive subscriber without being asked."""
    noon = T0 + 4 * 3600  # 12:00 local: today's window is over, the next round is tomorrow
    w = World(sqlite_url, start=noon)
    try:
        sid = w.enrol("860000000000001")
        w.db.write(repo.insert_rounds, [missed_round(sid, w.now() - timedelta(days=2))])
        w.sched.start()
        w.pump(2 * 3600 + 60, step=60)
        assert "inactivity" in [r.reason for r in w.rounds(sid)]
    finally:
        w.sched.stop()
        for db in w.dbs:
            db.stop()


# --- report -------------------------------------------------------------------------------------


def test_report_counts_per_district_per_local_day(world: World) -> None:
    """Due/answered/missed/pending and answer rate per district per Shanghai day (15:59Z≠16:01Z)."""
    a = world.enrol("860000000000001")
    b = world.enrol("860000000000002", district=OTHER_DISTRICT)

    def row(sid: int, district: str, due: datetime, status: str) -> dict[str, Any]:
        return {
            "subscriber_id": sid,
            "district": district,
            "reason": "schedule",
            "due_at": due,
            "params": FAST,
            "status": status,
        }

    z = lambda *args: datetime(*args, tzinfo=UTC)  # noqa: E731
    world.db.write(
        repo.insert_rounds,
        [
            row(a, DISTRICT, z(2026, 12, 3, 15, 59), "answered"),  # 23:59 on the 3rd: outside
            row(a, DISTRICT, z(2026, 12, 4, 1, 30), "missed"),  # 09:30 on the 4th
            row(a, DISTRICT, z(2026, 12, 4, 15, 59), "answered"),  # 23:59 on the 4th
            row(a, DISTRICT, z(2026, 12, 4, 16, 1), "answered"),  # 00:01 on the 5th
            row(a, DISTRICT, z(2026, 12, 5, 2, 0), "prompted"),  # 10:00 on the 5th
            row(a, DISTRICT, z(2026, 12, 5, 3, 0), "cancelled"),  # not counted
            row(b, OTHER_DISTRICT, z(2026, 12, 4, 1, 0), "answered"),
            row(b, OTHER_DISTRICT, z(2026, 12, 5, 16, 0), "answered"),  # 00:00 on the 6th: outside
        ],
    )
    lo = datetime(2026, 12, 4, tzinfo=SH)
    hi = datetime(2026, 12, 6, tzinfo=SH)

    got = world.db.query(lambda s: repo.report(s, None, lo, hi))
    by_key = {(d["district"], d["date"]): d for d in got}
    assert by_key == {
        (DISTRICT, "2026-12-04"): {
            "district": DISTRICT,
            "date": "2026-12-04",
            "due": 2,
            "answered": 1,
            "missed": 1,
            "pending": 0,
            "answer_rate": 0.5,
        },
        (DISTRICT, "2026-12-05"): {
            "district": DISTRICT,
            "date": "2026-12-05",
            "due": 2,
            "answered": 1,
            "missed": 0,
            "pending": 1,
            "answer_rate": 1.0,
        },
        (OTHER_DISTRICT, "2026-12-04"): {
            "district": OTHER_DISTRICT,
            "date": "2026-12-04",
            "due": 1,
            "answered": 1,
            "missed": 0,
            "pending": 0,
            "answer_rate": 1.0,
        },
    }
    assert got == sorted(got, key=lambda d: (d["district"], d["date"]))

    only = world.db.query(lambda s: repo.report(s, OTHER_DISTRICT, lo, hi))
    assert [(d["district"], d["date"], d["due"]) for d in only] == [
        (OTHER_DISTRICT, "2026-12-04", 1)
    ]


def test_report_answer_rate_is_none_without_closed_rounds(world: World) -> None:
    """A day with only pending rounds has an answer rate of None, not a division by zero."""
    a = world.enrol("860000000000001")
    run(world.sched.plan_missing())
    got = world.db.query(
        lambda s: repo.report(
            s, None, datetime(2026, 12, 4, tzinfo=SH), datetime(2026, 12, 5, tzinfo=SH)
        )
    )
    assert got == [
        {
            "district": DISTRICT,
            "date": "2026-12-04",
            "due": 1,
            "answered": 0,
            "missed": 0,
            "pending": 1,
            "answer_rate": None,
        }
    ]
    assert world.rounds(a)[0].status == "scheduled"


def test_a_day_of_rounds_adds_up_in_the_report(world: World) -> None:
    """A simulated day: ok, help, ignored and offline subscribers; the report matches the rows."""
    idents = [f"86000000000010{n}" for n in range(4)]
    sids = [world.enrol(i) for i in idents]
    links = [world.link(i) for i in idents[:3]]  # the fourth is offline: voice
    world.sched.start()
    rounds = {r.subscriber_id: r for r in world.rounds()}
    last = max(r.due_at for r in rounds.values())
    seen = {"ok": 0, "help": 0, "voice": 0}
    while world.now() < last + timedelta(hours=1):
        world.next_timer()
        for key, ident, link, answer in (
            ("ok", idents[0], links[0], ev.CareAnswer.OK),
            ("help", idents[1], links[1], ev.CareAnswer.HELP),
        ):
            for p in link.prompts()[seen[key] :]:
                world.answer(ident, p.round_id, answer)
            seen[key] = len(link.prompts())
        for call in world.channel.requests[seen["voice"] :]:
            run(world.sched.callback_answer(call.attempt_id.removeprefix("care-"), "accept"))
        seen["voice"] = len(world.channel.requests)
    states = {sid: world.round(rounds[sid].id) for sid in sids}
    assert [(s.status, s.answer) for s in states.values()] == [
        ("answered", "ok"),
        ("answered", "help"),
        ("missed", None),
        ("answered", "ok"),
    ]
    assert len(links[2].prompts()) == 3
    assert not any(r.late for r in states.values())  # every prompt went out on time
    report = world.db.query(
        lambda s: repo.report(
            s, DISTRICT, datetime(2026, 12, 4, tzinfo=SH), datetime(2026, 12, 5, tzinfo=SH)
        )
    )
    assert [(d["due"], d["answered"], d["missed"], d["answer_rate"]) for d in report] == [
        (4, 3, 1, 0.75)
    ]
    assert sorted(i.kind for i in world.incidents()) == ["care_missed", "sos"]


# --- planning bugs ------------------------------------------------------------------------------


def test_a_plan_change_plans_the_next_round_from_now(world: World) -> None:
    """Weekly → daily: the next round follows the new plan from now, not after the old round."""
    sids = [world.enrol(f"86000000000000{n}", alone=False) for n in range(1, 8)]
    run(world.sched.plan_missing())
    far = [r for r in world.rounds() if r.due_at - world.now() >= timedelta(days=2)]
    assert far, "some weekly subscriber is due two or more days from now"
    sid = far[0].subscriber_id
    assert sid in sids
    world.db.write(repo.save_plan, "subscriber", sid, {"cadence_days": 1}, "admin", world.now())
    run(world.sched.replan(sid))
    [r] = [x for x in world.rounds(sid) if x.status == "scheduled"]
    daily = cs.parse_plan({"cadence_days": 1}, fast_plan("with_family"))
    assert r.due_at == cs.next_due(daily, sid, world.now())


def test_a_subscriber_paused_beyond_the_horizon_does_not_stop_planning(sqlite_url) -> None:
    """One subscriber paused for years does not keep the others from being planned."""
    w = World(sqlite_url, config=CareConfig(plan_batch=2))
    try:
        paused = w.enrol("860000000000001")
        w.db.write(
            repo.save_plan,
            "subscriber",
            paused,
            {"pauses": [["2026-01-01", "2028-12-31"]]},
            "admin",
            w.now(),
        )
        others = [w.enrol(f"86000000000000{n}") for n in range(2, 6)]
        run(w.sched.plan_missing())
        assert w.rounds(paused) == []
        assert [len(w.rounds(sid)) for sid in others] == [1, 1, 1, 1]
    finally:
        w.sched.stop()
        for db in w.dbs:
            db.stop()
