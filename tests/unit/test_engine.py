"""The escalation engine: from an SOS to a human who accepted, on a fake clock and channel.

Storage is a real SQLite file behind :class:`tests.unit.fakes.SyncDatabase`, whose
Deferreds have already fired, so every engine coroutine completes synchronously
inside ``defer.ensureDeferred``.  Time is a :class:`twisted.internet.task.Clock`
set to 2027-01-16 02:00 UTC, i.e. 10:00 in Wenzhou: daytime for the default
alarm policy (family first, two rounds).  Timers due "now" are ``callLater(0)``
calls, so ``clock.advance(0)`` runs them without moving time.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from twisted.internet import defer, task
from twisted.python.failure import Failure

from dispatch.routing import policy as pol
from dispatch.routing.channels import CallRequest
from dispatch.routing.engine import EscalationEngine
from dispatch.store import escalation as repo
from dispatch.store import incidents as incident_repo
from dispatch.store import subscribers as subscriber_repo
from dispatch.store.errors import Conflict, NotFound
from dispatch.store.models import Attempt, Device, EscalationTimer, Incident, Policy
from tests.unit.fakes import DISTRICT, SyncDatabase

T0 = 1_800_000_000 + 18 * 3600  # 2027-01-16 02:00 UTC = 10:00 Asia/Shanghai
IDENT = "860000000000042"
SON = "13900000001"
DAUGHTER = "13900000002"
WORKER = "13900000009"
CONTACTS = [
    {"name": "Li Wei", "phone": SON, "relation": "son"},
    {"name": "Li Na", "phone": DAUGHTER, "relation": "daughter"},
    {"name": "Zhao Min", "phone": WORKER, "relation": "worker", "tier": "community"},
]
QUICK = {
    "kinds": ["sos", "fall"],
    "relay_deadline_s": 300,
    "steps": [
        {"tier": "family", "targets": "all", "channels": ["voice"], "wait_s": 60},
        {"tier": "relay_120", "wait_s": 300},
        {"tier": "operator", "wait_s": 0},
    ],
}


def result_of(d: defer.Deferred[Any]) -> Any:
    """The result of an already-fired Deferred (re-raising a failure)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def run(coro: Any) -> Any:
    """Run an engine coroutine that completes synchronously and return its result."""
    return result_of(defer.ensureDeferred(coro))


class FakeChannel:
    """Records every CallRequest; requests to a phone in ``fail`` report failure."""

    name = "fake"

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.requests: list[CallRequest] = []
        self.fail = set(fail)

    def send(self, request: CallRequest) -> defer.Deferred[bool]:
        self.requests.append(request)
        return defer.succeed(request.phone not in self.fail)

    def sent(self) -> list[tuple[str, str]]:
        """(phone, channel) of every request, in order."""
        return [(r.phone, r.channel) for r in self.requests]


class World:
    """A clock, a database with one subscriber, a fake channel and a started engine."""

    def __init__(self, url: str, start: float = T0) -> None:
        self.url = url
        self.clock = task.Clock()
        self.clock.advance(start)
        self.dbs = [SyncDatabase(url)]
        self.db = self.dbs[0]
        self.channel = FakeChannel()
        self.engines: list[EscalationEngine] = []
        self.sub_id, self.device_id = self._seed()
        self.engine = self.new_engine(self.db, self.channel)
        self.seq = 0

    def now(self) -> datetime:
        """The clock's time as a datetime."""
        return datetime.fromtimestamp(self.clock.seconds(), UTC)

    def _seed(self) -> tuple[int, int]:
        body = {
            "name": "王芳",
            "district": DISTRICT,
            "address": "1 Wuma Street",
            "living_situation": "alone",
            "health": "cardiac",
            "contacts": CONTACTS,
            "device": {"protocol": "native", "ident": IDENT},
        }
        with self.db.session_sync() as s, s.begin():
            sub_id = subscriber_repo.create_subscriber(s, body, self.now() - timedelta(days=30))
            device_id = s.scalar(select(Device.id).where(Device.ident == IDENT))
        return sub_id, device_id

    def new_engine(self, db: SyncDatabase, channel: FakeChannel) -> EscalationEngine:
        """Build and start an engine (installs the default policies)."""
        engine = EscalationEngine(self.clock, db, channel, callback_base="http://cb")
        run(engine.start())
        self.engines.append(engine)
        return engine

    def restart(self) -> FakeChannel:
        """Stop the engine and start a new one on a new connection to the same file."""
        self.engine.stop()
        self.db = SyncDatabase(self.url)
        self.dbs.append(self.db)
        self.channel = FakeChannel()
        self.engine = self.new_engine(self.db, self.channel)
        return self.channel

    def sos(self) -> int:
        """Record a new SOS press at the current time; returns the incident id."""
        self.seq += 1
        sos = incident_repo.SosInput(
            device_id=self.device_id,
            device_ident=IDENT,
            subscriber_id=self.sub_id,
            seq=self.seq,
            kind="sos",
            received_at=self.now(),
            lat=27.994,
            lon=120.699,
            accuracy_m=15,
        )
        record = result_of(self.db.write(incident_repo.record_sos, sos, timedelta(minutes=5)))
        assert record.created
        return record.incident_id

    def begin(self, incident_id: int) -> None:
        """Plan the incident and run its first wave (due now)."""
        run(self.engine.start_incident(incident_id))
        self.clock.advance(0)

    def answer(self, attempt_id: str, answer: str, responder: str | None = None) -> dict:
        return run(self.engine.answer(attempt_id, answer, responder))

    def operator(self, incident_id: int, action: str, actor: str = "op1", **kw: Any) -> dict:
        return run(self.engine.operator(incident_id, action, actor, **kw))

    def save_policy(
        self,
        name: str,
        scope: str,
        document: dict[str, Any],
        *,
        district: str | None = None,
        subscriber_id: int | None = None,
    ) -> dict[str, Any]:
        return result_of(
            self.db.write(
                repo.save_policy,
                name,
                scope,
                district,
                subscriber_id,
                document,
                "admin",
                self.now(),
            )
        )

    def timeline(self, incident_id: int) -> list[dict[str, Any]]:
        return self.db.query(lambda s: incident_repo.get_incident(s, incident_id))["timeline"]

    def actions(self, incident_id: int, action: str) -> list[dict[str, Any]]:
        return [e for e in self.timeline(incident_id) if e["action"] == action]

    def incident(self, incident_id: int) -> Incident:
        return self.db.query(lambda s: s.get(Incident, incident_id))

    def attempt(self, attempt_id: str) -> Attempt:
        return self.db.query(lambda s: s.get(Attempt, attempt_id))

    def pending_timers(self, incident_id: int) -> int:
        return self.db.count(
            EscalationTimer,
            EscalationTimer.incident_id == incident_id,
            EscalationTimer.status == "pending",
        )

    def close(self) -> None:
        for engine in self.engines:
            engine.stop()
        for db in self.dbs:
            db.stop()


@pytest.fixture
def world(sqlite_url: str) -> Any:
    """A started engine at 10:00 Wenzhou time with one subscriber (2 family, 1 community)."""
    w = World(sqlite_url)
    yield w
    w.close()


def wave(world: World, n: int) -> list[CallRequest]:
    """The requests of the n-th pair sent (each family/community wave is voice + sms)."""
    return world.channel.requests[2 * n : 2 * n + 2]


# --- 1. the ladder ------------------------------------------------------------------------


def test_first_family_contact_notified_at_once(world: World) -> None:
    """The first family contact gets a voice call and an SMS at the moment of the SOS."""
    iid = world.sos()
    world.begin(iid)
    assert world.channel.sent() == [(SON, "voice"), (SON, "sms")]
    voice, sms = world.channel.requests
    assert (voice.type, sms.type) == ("call", "sms")
    assert voice.attempt_id != sms.attempt_id
    for r in (voice, sms):
        assert r.callback_url == f"http://cb/api/v1/callbacks/{r.attempt_id}"
        assert (r.incident_id, r.incident_kind, r.tier) == (iid, "sos", "family")
        assert (r.name, r.relation) == ("Li Wei", "son")
        assert r.subscriber is not None
        assert r.subscriber["name"] == "王芳"
        assert r.subscriber["address"] == "1 Wuma Street"
        assert r.subscriber["location"] == {"lat": 27.994, "lon": 120.699}
        assert "王芳" in r.message and "1 Wuma Street" in r.message
        assert r.expires_at == datetime.fromtimestamp(T0 + 3600, UTC).isoformat()
    assert {world.attempt(r.attempt_id).status for r in (voice, sms)} == {"calling"}


def test_ladder_family_two_rounds_then_community(world: World) -> None:
    """Unanswered by day: son, daughter every 60 s for two rounds, then the community worker."""
    iid = world.sos()
    world.begin(iid)
    world.clock.advance(59)
    assert len(world.channel.requests) == 2
    world.clock.advance(1)
    assert [r.phone for r in wave(world, 1)] == [DAUGHTER, DAUGHTER]
    world.clock.advance(60)
    assert [r.phone for r in wave(world, 2)] == [SON, SON]
    world.clock.advance(60)
    assert [r.phone for r in wave(world, 3)] == [DAUGHTER, DAUGHTER]
    world.clock.advance(59)
    assert len(world.channel.requests) == 8
    world.clock.advance(1)
    community = wave(world, 4)
    assert [(r.phone, r.tier) for r in community] == [(WORKER, "community")] * 2
    assert len({r.attempt_id for r in world.channel.requests}) == 10
    notify = [(e["tier"], e["target"], e["channel"]) for e in world.actions(iid, "notify")]
    son, daughter, worker = f"Li Wei {SON}", f"Li Na {DAUGHTER}", f"Zhao Min {WORKER}"
    assert notify == [
        ("family", son, "voice"),
        ("family", son, "sms"),
        ("family", daughter, "voice"),
        ("family", daughter, "sms"),
        ("family", son, "voice"),
        ("family", son, "sms"),
        ("family", daughter, "voice"),
        ("family", daughter, "sms"),
        ("community", worker, "voice"),
        ("community", worker, "sms"),
    ]
    attempts = [e["detail"]["attempt"] for e in world.actions(iid, "notify")]
    assert attempts == [r.attempt_id for r in world.channel.requests]


def test_ladder_ends_with_relay_then_operator(world: World) -> None:
    """Past the relay deadline 120 is called without waiting, then operator, then exhausted."""
    iid = world.sos()
    world.begin(iid)
    world.clock.pump([60, 60, 60, 60])  # four family waves, then community at +240 s
    world.clock.advance(90)  # +330 s: older than relay_deadline_s (300)
    relay = world.channel.requests[-1]
    assert (relay.type, relay.phone, relay.tier, relay.channel) == (
        "relay",
        "120",
        "relay_120",
        "relay",
    )
    assert world.actions(iid, "relay_pending") == []
    assert len(world.actions(iid, "relay")) == 1
    world.clock.advance(300)
    assert len(world.actions(iid, "operator_alerted")) == 1
    exhausted = world.actions(iid, "escalation_exhausted")
    assert [e["outcome"] for e in exhausted] == ["nobody_accepted"]
    assert world.incident(iid).status == "open"  # still on the operators' queue
    assert world.pending_timers(iid) == 0


def test_night_sos_calls_community_first(sqlite_url: str) -> None:
    """An SOS at 23:00 Wenzhou time runs the night ladder: community, then each family member."""
    world = World(sqlite_url, start=T0 - 11 * 3600)  # 2027-01-15 15:00 UTC = 23:00 local
    try:
        iid = world.sos()
        world.begin(iid)
        assert world.channel.sent() == [(WORKER, "voice"), (WORKER, "sms")]
        world.clock.advance(89)
        assert len(world.channel.requests) == 2
        world.clock.advance(1)
        assert [r.phone for r in wave(world, 1)] == [SON, SON]
        world.clock.advance(60)
        assert [r.phone for r in wave(world, 2)] == [DAUGHTER, DAUGHTER]
        started = world.actions(iid, "escalation_started")[0]["detail"]
        assert started["waves"] == 5
    finally:
        world.close()


def test_incident_opened_survives_storage_failure(world: World) -> None:
    """incident_opened swallows a storage error; a failed batch is retried one by one."""
    iid = world.sos()
    world.db.fail_next.add("read")
    world.engine.incident_opened(iid)  # must not raise
    world.clock.advance(0)
    assert world.channel.sent() == [(SON, "voice"), (SON, "sms")]


def test_incident_that_cannot_be_planned_is_planned_at_next_start(world: World) -> None:
    """Planning fails twice (batch and single): the open incident is planned at restart."""
    iid = world.sos()

    async def broken(incident_id: int) -> None:
        raise RuntimeError("database unreachable")

    world.db.fail_next.add("read")
    world.engine.start_incident = broken  # the one-by-one retry fails too
    world.engine.incident_opened(iid)
    world.clock.advance(0)
    assert world.channel.requests == []
    new = world.restart()
    world.clock.advance(0)
    assert new.sent() == [(SON, "voice"), (SON, "sms")]


def test_start_incident_twice_plans_once(world: World) -> None:
    """Planning the same incident twice (a repeated listener call) starts one escalation."""
    iid = world.sos()
    world.begin(iid)
    world.begin(iid)
    assert len(world.channel.requests) == 2
    assert len(world.actions(iid, "escalation_started")) == 1
    assert world.pending_timers(iid) == 1


def test_on_change_listeners_hear_notifications_and_answers(world: World) -> None:
    """on_change listeners are told when a wave is sent and when it is answered."""
    heard: list[tuple[int, str]] = []
    world.engine.on_change.append(lambda i, what: heard.append((i, what)))
    iid = world.sos()
    world.begin(iid)
    world.answer(world.channel.requests[0].attempt_id, "accept", SON)
    assert heard == [(iid, "notified"), (iid, "accepted")]


# --- 2. accept ------------------------------------------------------------------------------


def test_accept_acknowledges_and_stops_escalation(world: World) -> None:
    """An accept acknowledges the incident for the family tier and nothing more is sent."""
    iid = world.sos()
    world.begin(iid)
    voice, sms = world.channel.requests
    result = world.answer(voice.attempt_id, "accept", SON)
    assert (result["result"], result["incident_id"]) == ("accepted", iid)
    inc = world.incident(iid)
    assert inc.status == "acknowledged"
    assert inc.acknowledged_tier == "family"
    assert inc.acknowledged_by == "Li Wei"
    assert inc.acknowledged_at == world.now()
    assert world.pending_timers(iid) == 0
    assert world.attempt(voice.attempt_id).status == "accepted"
    assert world.attempt(sms.attempt_id).status == "cancelled"
    answers = world.actions(iid, "answer")
    assert [(a["outcome"], a["actor"]) for a in answers] == [("accepted", SON)]
    world.clock.advance(3600)
    assert len(world.channel.requests) == 2


def test_late_accept_from_earlier_wave_still_counts(world: World) -> None:
    """The son accepting after the daughter was called still acknowledges and stops the ladder."""
    iid = world.sos()
    world.begin(iid)
    world.clock.advance(60)
    assert len(world.channel.requests) == 4
    world.answer(world.channel.requests[1].attempt_id, "accept", SON)
    assert world.incident(iid).status == "acknowledged"
    world.clock.advance(3600)
    assert len(world.channel.requests) == 4


def test_answering_twice_is_a_conflict(world: World) -> None:
    """An attempt that was already answered cannot be answered again."""
    iid = world.sos()
    world.begin(iid)
    attempt = world.channel.requests[0].attempt_id
    world.answer(attempt, "decline", SON)
    with pytest.raises(Conflict, match="already answered"):
        world.answer(attempt, "accept", SON)


# --- 3. decline -----------------------------------------------------------------------------


def test_decline_of_whole_wave_moves_on_at_once(world: World) -> None:
    """When every attempt of the wave is declined the next contact is called without waiting."""
    iid = world.sos()
    world.begin(iid)
    for r in list(world.channel.requests):
        world.answer(r.attempt_id, "decline", SON)
    world.clock.advance(0)
    assert [r.phone for r in wave(world, 1)] == [DAUGHTER, DAUGHTER]
    assert world.clock.seconds() == T0
    declines = world.actions(iid, "answer")
    assert [d["outcome"] for d in declines] == ["declined", "declined"]
    assert world.incident(iid).status == "open"
    # The next wave keeps its own full wait.
    world.clock.advance(59)
    assert len(world.channel.requests) == 4
    world.clock.advance(1)
    assert [r.phone for r in wave(world, 2)] == [SON, SON]


def test_decline_of_one_attempt_keeps_waiting(world: World) -> None:
    """A declined voice call while the SMS is still open does not cut the 60 s wait."""
    iid = world.sos()
    world.begin(iid)
    world.answer(world.channel.requests[0].attempt_id, "decline", SON)
    world.clock.advance(59)
    assert len(world.channel.requests) == 2
    world.clock.advance(1)
    assert [r.phone for r in wave(world, 1)] == [DAUGHTER, DAUGHTER]
    assert world.incident(iid).status == "open"


# --- 4. channel failure -----------------------------------------------------------------------


def test_channel_failure_is_recorded_and_moves_on(sqlite_url: str) -> None:
    """A channel that cannot deliver marks the attempt failed and the next contact is called."""
    world = World(sqlite_url)
    try:
        world.channel.fail = {SON}
        iid = world.sos()
        world.begin(iid)
        assert world.channel.sent() == [
            (SON, "voice"),
            (SON, "sms"),
            (DAUGHTER, "voice"),
            (DAUGHTER, "sms"),
        ]
        assert world.clock.seconds() == T0
        failed = world.actions(iid, "answer")
        assert [(e["outcome"], e["channel"], e["target"]) for e in failed] == [
            ("failed", "voice", f"Li Wei {SON}"),
            ("failed", "sms", f"Li Wei {SON}"),
        ]
        assert all(e["detail"]["attempt"] for e in failed)
        for r in world.channel.requests[:2]:
            assert world.attempt(r.attempt_id).status == "failed"
        for r in world.channel.requests[2:]:
            assert world.attempt(r.attempt_id).status == "calling"
        world.clock.advance(60)  # the daughter's wave still waits its full time
        assert [r.phone for r in wave(world, 2)] == [SON, SON]
    finally:
        world.close()


def test_every_channel_down_reaches_relay_decision_at_once(sqlite_url: str) -> None:
    """With every call failing, the ladder runs through all contacts at once to the relay."""
    world = World(sqlite_url)
    try:
        world.channel.fail = {SON, DAUGHTER, WORKER, "120"}
        iid = world.sos()
        world.begin(iid)
        ladder = [SON, DAUGHTER, SON, DAUGHTER, WORKER]
        assert [p for p, _ in world.channel.sent()] == [p for p in ladder for _ in range(2)]
        assert world.clock.seconds() == T0
        assert len(world.actions(iid, "relay_pending")) == 1
        assert len(world.actions(iid, "answer")) == 10
    finally:
        world.close()


# --- 5. relay ----------------------------------------------------------------------------------


def relay_world(world: World) -> int:
    """Install QUICK for the subscriber, raise an SOS and run up to the relay wave (+60 s)."""
    world.save_policy("quick", "subscriber", QUICK, subscriber_id=world.sub_id)
    iid = world.sos()
    world.begin(iid)
    assert world.channel.sent() == [(SON, "voice"), (DAUGHTER, "voice")]
    world.clock.advance(60)
    return iid


def test_young_incident_relay_waits_for_operator(world: World) -> None:
    """Before the relay deadline the 120 relay is held as relay_pending, nothing sent to 120."""
    iid = relay_world(world)
    pending = world.actions(iid, "relay_pending")
    assert len(pending) == 1
    entry = pending[0]
    assert (entry["tier"], entry["target"], entry["channel"], entry["outcome"]) == (
        "relay_120",
        "120",
        "relay",
        "awaiting_operator",
    )
    assert entry["detail"]["deadline"] == datetime.fromtimestamp(T0 + 300, UTC).isoformat()
    world.clock.advance(200)
    assert [r.phone for r in world.channel.requests] == [SON, DAUGHTER]


def test_relay_confirm_sends_to_120_with_subscriber(world: World) -> None:
    """relay_confirm sends one relay request to 120 carrying the subscriber block."""
    iid = relay_world(world)
    world.clock.advance(40)
    world.operator(iid, "relay_confirm")
    world.clock.advance(0)
    relay = world.channel.requests[-1]
    assert (relay.type, relay.phone, relay.tier, relay.channel) == (
        "relay",
        "120",
        "relay_120",
        "relay",
    )
    assert relay.subscriber is not None
    assert relay.subscriber["name"] == "王芳"
    assert relay.subscriber["address"] == "1 Wuma Street"
    assert relay.subscriber["health"] == "cardiac"
    assert relay.subscriber["location"] == {"lat": 27.994, "lon": 120.699}
    assert [c["phone"] for c in relay.subscriber["contacts"]] == [SON, DAUGHTER, WORKER]
    assert relay.callback_url == f"http://cb/api/v1/callbacks/{relay.attempt_id}"
    assert [e["actor"] for e in world.actions(iid, "relay_confirm")] == ["op1"]
    assert len(world.actions(iid, "relay")) == 1
    world.clock.advance(200)  # past the old deadline: no second relay
    assert sum(r.phone == "120" for r in world.channel.requests) == 1
    assert world.actions(iid, "relay_deadline_passed") == []


def test_relay_goes_out_when_deadline_passes(world: World) -> None:
    """With no operator decision the relay is sent when the deadline (300 s after SOS) passes."""
    iid = relay_world(world)
    world.clock.advance(239)
    assert all(r.phone != "120" for r in world.channel.requests)
    world.clock.advance(1)
    assert [(r.phone, r.type) for r in world.channel.requests[2:]] == [("120", "relay")]
    passed = world.actions(iid, "relay_deadline_passed")
    assert len(passed) == 1
    assert passed[0]["detail"] == {"late": False}


def test_relay_skip_moves_on_without_120(world: World) -> None:
    """relay_skip moves straight to the next wave (operator) and 120 is never called."""
    iid = relay_world(world)
    world.operator(iid, "relay_skip")
    world.clock.advance(0)
    assert len(world.actions(iid, "operator_alerted")) == 1
    world.clock.advance(3600)
    assert all(r.phone != "120" for r in world.channel.requests)
    assert world.actions(iid, "relay_deadline_passed") == []


def test_restart_while_relay_pending_keeps_the_deadline(world: World) -> None:
    """A restart while a relay awaits the operator still sends it, once, at the deadline."""
    iid = relay_world(world)
    world.clock.advance(40)
    new = world.restart()
    world.clock.advance(199)
    assert new.requests == []
    world.clock.advance(1)
    assert [(r.phone, r.type) for r in new.requests] == [("120", "relay")]
    assert len(world.actions(iid, "relay_deadline_passed")) == 1
    assert len(world.actions(iid, "relay")) == 1


def test_relay_decision_without_waiting_relay_is_conflict(world: World) -> None:
    """relay_confirm when no relay is waiting is refused as a conflict."""
    iid = world.sos()
    world.begin(iid)
    with pytest.raises(Conflict, match="no 110/120 relay waiting"):
        world.operator(iid, "relay_confirm")


# --- 6. operator actions ---------------------------------------------------------------------


def test_operator_acknowledge_stops_escalation(world: World) -> None:
    """An operator acknowledging stops a running escalation for good."""
    iid = world.sos()
    world.begin(iid)
    result = world.operator(iid, "acknowledge")
    assert result["status"] == "acknowledged"
    inc = world.incident(iid)
    assert (inc.acknowledged_tier, inc.acknowledged_by) == ("operator", "op1")
    assert world.pending_timers(iid) == 0
    world.clock.advance(3600)
    assert len(world.channel.requests) == 2
    with pytest.raises(Conflict):
        world.operator(iid, "acknowledge", "op2")


def test_resolve_records_outcome_once(world: World) -> None:
    """resolve stores the outcome; a second resolve is a conflict."""
    iid = world.sos()
    world.begin(iid)
    world.operator(iid, "resolve", outcome="false_alarm")
    inc = world.incident(iid)
    assert (inc.status, inc.outcome, inc.resolved_at) == ("resolved", "false_alarm", world.now())
    assert [e["outcome"] for e in world.actions(iid, "resolve")] == ["false_alarm"]
    with pytest.raises(Conflict, match="already resolved"):
        world.operator(iid, "resolve", "op2", outcome="ambulance")
    assert world.incident(iid).outcome == "false_alarm"
    world.clock.advance(3600)
    assert len(world.channel.requests) == 2


def test_claim_by_second_operator_is_conflict(world: World) -> None:
    """Only one operator can hold a claim; reclaiming by the holder is fine."""
    iid = world.sos()
    world.begin(iid)
    world.operator(iid, "claim", "op1")
    world.operator(iid, "claim", "op1")
    with pytest.raises(Conflict, match="claimed by op1"):
        world.operator(iid, "claim", "op2")
    assert world.incident(iid).claimed_by == "op1"


def test_answer_for_resolved_incident_is_conflict(world: World) -> None:
    """A responder answering an attempt of a resolved incident gets a conflict."""
    iid = world.sos()
    world.begin(iid)
    world.operator(iid, "resolve", outcome="helped_by_family")
    with pytest.raises(Conflict):
        world.answer(world.channel.requests[0].attempt_id, "accept", SON)
    assert world.incident(iid).status == "resolved"


def test_unknown_attempt_and_incident_are_not_found(world: World) -> None:
    """An unknown attempt id or incident id raises NotFound."""
    with pytest.raises(NotFound):
        world.answer("0" * 24, "accept", SON)
    with pytest.raises(NotFound):
        world.operator(999_999, "acknowledge")


# --- 7. durability ----------------------------------------------------------------------------


def notify_count_per_wave(world: World, incident_id: int) -> Counter[int]:
    """How many attempts (= notify entries) each wave created."""
    rows = world.db.query(
        lambda s: list(s.scalars(select(Attempt.wave).where(Attempt.incident_id == incident_id)))
    )
    return Counter(rows)


def test_restart_fires_overdue_step_once_marked_late(world: World) -> None:
    """A step due while the engine was down fires once at restart, marked late in the timeline."""
    iid = world.sos()
    world.begin(iid)
    old = world.channel
    world.clock.advance(30)
    world.engine.stop()
    world.clock.advance(600)  # wave 1 was due at +60 s
    assert len(old.requests) == 2
    new = world.restart()
    world.clock.advance(0)
    assert new.sent() == [(DAUGHTER, "voice"), (DAUGHTER, "sms")]
    assert len(old.requests) == 2
    entries = world.actions(iid, "notify")
    assert [e["detail"].get("late") for e in entries] == [None, None, True, True]
    assert {e["detail"]["attempt"] for e in entries[2:]} == {r.attempt_id for r in new.requests}
    world.clock.advance(60)  # the next wave is on time again
    assert [r.phone for r in new.requests[2:]] == [SON, SON]
    assert world.actions(iid, "notify")[-1]["detail"].get("late") is None
    assert notify_count_per_wave(world, iid) == {0: 2, 1: 2, 2: 2}
    assert len(world.actions(iid, "notify")) == 6


def test_restart_before_due_fires_on_time(world: World) -> None:
    """A restart before the next step is due fires it at its original time, not late."""
    iid = world.sos()
    world.begin(iid)
    world.clock.advance(30)
    new = world.restart()
    world.clock.advance(29)
    assert new.requests == []
    world.clock.advance(1)
    assert [r.phone for r in new.requests] == [DAUGHTER, DAUGHTER]
    assert [e["detail"].get("late") for e in world.actions(iid, "notify")] == [None] * 4


def test_two_engines_on_one_timer_fire_it_once(world: World) -> None:
    """When an old and a new engine both schedule the same timer, only one places the wave."""
    iid = world.sos()
    world.begin(iid)
    old_channel = world.channel
    second_db = SyncDatabase(world.url)
    world.dbs.append(second_db)
    new_channel = FakeChannel()
    world.new_engine(second_db, new_channel)  # old_engine is still running
    world.clock.advance(60)
    assert len(old_channel.requests) + len(new_channel.requests) == 4
    assert notify_count_per_wave(world, iid) == {0: 2, 1: 2}
    assert len(world.actions(iid, "notify")) == 4


def test_restart_does_not_escalate_acknowledged_incident(world: World) -> None:
    """An incident acknowledged before the restart is left alone by the new engine."""
    iid = world.sos()
    world.begin(iid)
    world.answer(world.channel.requests[0].attempt_id, "accept", SON)
    world.engine.stop()
    world.clock.advance(600)
    new = world.restart()
    world.clock.advance(3600)
    assert new.requests == []
    assert world.incident(iid).status == "acknowledged"


# --- 8. orphaned incidents ------------------------------------------------------------------


def test_start_plans_incident_that_never_got_an_escalation(world: World) -> None:
    """start() plans and runs an open incident whose SOS was stored but never planned."""
    iid = world.sos()  # committed; the process "dies" before start_incident
    assert world.actions(iid, "escalation_started") == []
    world.clock.advance(20)
    new = world.restart()
    world.clock.advance(0)
    assert new.sent() == [(SON, "voice"), (SON, "sms")]
    assert len(world.actions(iid, "escalation_started")) == 1
    world.restart()  # a second restart does not plan it again
    world.clock.advance(0)
    assert len(world.actions(iid, "escalation_started")) == 1


# --- 9. / 10. policy selection and versions ---------------------------------------------------


def first_calls(world: World, iid: int) -> list[tuple[str, str]]:
    """(phone, channel) of the first wave sent for this incident."""
    return [(r.phone, r.channel) for r in world.channel.requests if r.incident_id == iid]


def global_alarm(world: World) -> Policy:
    return world.db.query(
        lambda s: s.scalar(select(Policy).where(Policy.scope == "global", Policy.name == "alarm"))
    )


def new_incident(world: World) -> int:
    """Resolve whatever is open for the device and raise a fresh SOS, run to its first wave."""
    for inc in world.db.query(
        lambda s: list(s.scalars(select(Incident).where(Incident.status != "resolved")))
    ):
        world.operator(inc.id, "resolve", outcome="false_alarm")
    iid = world.sos()
    world.begin(iid)
    return iid


COMMUNITY_FIRST = {"kinds": ["sos"], "steps": [{"tier": "community", "channels": ["voice"]}]}
FAMILY_SMS_ALL = {
    "kinds": ["sos"],
    "steps": [{"tier": "family", "targets": "all", "channels": ["sms"]}],
}


def test_start_installs_default_policies_once(world: World) -> None:
    """start() stores each shipped default once as a global version 1."""
    world.restart()
    rows = world.db.query(lambda s: list(s.scalars(select(Policy))))
    assert sorted((p.name, p.scope, p.version, p.active) for p in rows) == sorted(
        (name, "global", 1, True) for name in pol.DEFAULT_POLICIES
    )


def test_global_policy_used_and_recorded(world: World) -> None:
    """With no overrides the global alarm policy runs and the incident records it."""
    iid = new_incident(world)
    assert first_calls(world, iid) == [(SON, "voice"), (SON, "sms")]
    g = global_alarm(world)
    inc = world.incident(iid)
    assert (inc.policy_id, inc.policy_version) == (g.id, 1)
    started = world.actions(iid, "escalation_started")[0]["detail"]
    assert started == {"policy_id": g.id, "policy_version": 1, "waves": 7}


def test_district_overrides_global_and_subscriber_overrides_district(world: World) -> None:
    """A district policy beats the global one and a subscriber policy beats both."""
    district = world.save_policy("lucheng", "district", COMMUNITY_FIRST, district=DISTRICT)
    iid = new_incident(world)
    assert first_calls(world, iid) == [(WORKER, "voice")]
    assert world.incident(iid).policy_id == district["id"]

    mine = world.save_policy("wang", "subscriber", FAMILY_SMS_ALL, subscriber_id=world.sub_id)
    iid = new_incident(world)
    assert first_calls(world, iid) == [(SON, "sms"), (DAUGHTER, "sms")]
    assert world.incident(iid).policy_id == mine["id"]


def test_other_district_policy_is_ignored(world: World) -> None:
    """A district policy for another district does not apply to this subscriber."""
    world.save_policy("ouhai", "district", COMMUNITY_FIRST, district="瓯海区")
    iid = new_incident(world)
    assert first_calls(world, iid) == [(SON, "voice"), (SON, "sms")]
    assert world.incident(iid).policy_id == global_alarm(world).id


def test_new_version_runs_and_is_recorded(world: World) -> None:
    """Saving a policy again bumps its version; each incident records the version it ran."""
    v1 = world.save_policy("wang", "subscriber", FAMILY_SMS_ALL, subscriber_id=world.sub_id)
    first = new_incident(world)
    v2 = world.save_policy("wang", "subscriber", COMMUNITY_FIRST, subscriber_id=world.sub_id)
    assert (v1["version"], v2["version"]) == (1, 2)
    assert v1["id"] != v2["id"]
    second = new_incident(world)
    assert first_calls(world, second) == [(WORKER, "voice")]
    a, b = world.incident(first), world.incident(second)
    assert (a.policy_id, a.policy_version) == (v1["id"], 1)
    assert (b.policy_id, b.policy_version) == (v2["id"], 2)


def test_policy_of_another_kind_is_not_chosen(world: World) -> None:
    """A subscriber policy for care_missed does not take over that subscriber's SOS."""
    other = {"kinds": ["care_missed"], "steps": [{"tier": "community", "channels": ["sms"]}]}
    world.save_policy("care", "subscriber", other, subscriber_id=world.sub_id)
    iid = new_incident(world)
    assert first_calls(world, iid) == [(SON, "voice"), (SON, "sms")]
    assert world.incident(iid).policy_id == global_alarm(world).id


def test_invalid_stored_policy_is_skipped(world: World) -> None:
    """A stored document that no longer parses is skipped for the next candidate."""
    world.save_policy(
        "broken", "subscriber", {"kinds": ["sos"], "steps": []}, subscriber_id=world.sub_id
    )
    iid = new_incident(world)
    assert first_calls(world, iid) == [(SON, "voice"), (SON, "sms")]
    assert world.incident(iid).policy_id == global_alarm(world).id


def test_same_name_saved_twice_keeps_both_versions(world: World) -> None:
    """Saving a policy name twice keeps both versions and only the newest is active."""
    v1 = world.save_policy("night shift", "global", COMMUNITY_FIRST)
    v2 = world.save_policy("night shift", "global", FAMILY_SMS_ALL)
    rows = world.db.query(
        lambda s: list(
            s.scalars(select(Policy).where(Policy.name == "night shift").order_by(Policy.version))
        )
    )
    assert [(p.id, p.version, p.active) for p in rows] == [
        (v1["id"], 1, False),
        (v2["id"], 2, True),
    ]
    assert rows[0].document == COMMUNITY_FIRST
    assert rows[1].document == FAMILY_SMS_ALL
    active = world.db.query(lambda s: repo.list_policies(s, active_only=True))
    assert [p["version"] for p in active if p["name"] == "night shift"] == [2]
    every = world.db.query(lambda s: repo.list_policies(s, active_only=False))
    assert [p["version"] for p in every if p["name"] == "night shift"] == [2, 1]
    assert world.db.query(lambda s: repo.get_policy(s, v1["id"]))["active"] is False
