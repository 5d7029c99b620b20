"""The escalation engine: from an incident to a human who said "I'm going".

It plans each new incident from its policy, keeps one reactor timer per
durable timer row, fires waves of notifications through the channel, and
applies answers and operator actions.  All state that matters lives in the
store; the in-memory timers are only a schedule of it, rebuilt at start.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet import defer, task

from dispatch import logs, metrics
from dispatch.routing import policy as pol
from dispatch.routing.channels import CallRequest, Channel
from dispatch.store import escalation as repo

log = logs.get(__name__)

# Due timers fired, and new incidents planned, per transaction.  While both are waiting
# the engine takes one batch of each in turn (see _work_queued).
TIMER_BATCH = 200
PLAN_BATCH = 200
# Longest a batch waits for SOS frames still being committed (see alarms_pending).
ALARMS_FIRST_MAX_S = 1.0

MESSAGES = {
    "sos": "{name} pressed the emergency button{where}. Reply accept if you are going.",
    "fall": "{name}'s terminal detected a fall{where}. Reply accept if you are going.",
    "care_missed": "{name} did not answer today's care check. Please check on them.",
    "offline": "{name}'s emergency terminal is offline. Please check its power.",
    "low_battery": "{name}'s emergency terminal battery is low. Please charge it.",
}


def _choose(candidates: list[dict[str, Any]], kind: str) -> tuple[dict | None, pol.Policy]:
    """Subscriber override, then district default, then global; the first for this kind."""
    rank = {"subscriber": 0, "district": 1, "global": 2}
    for cand in sorted(candidates, key=lambda c: (rank[c["scope"]], -c["version"])):
        try:
            parsed = pol.parse(cand["document"])
        except pol.PolicyError:
            log.error("stored_policy_invalid", policy=cand["id"])
            continue
        if kind in parsed.kinds:
            return cand, parsed
    fallback = pol.parse(
        pol.DEFAULT_POLICIES["alarm"]
        if kind in ("sos", "fall")
        else pol.DEFAULT_POLICIES.get(kind, pol.DEFAULT_POLICIES["offline"])
    )
    return None, fallback


def _profile(subscriber: dict[str, Any] | None) -> pol.Profile:
    if subscriber is None:
        return pol.Profile()
    return pol.Profile(
        lives_alone=subscriber.get("living_situation") == "alone",
        health=subscriber.get("health"),
        disability=subscriber.get("disability_type"),
    )


class EscalationEngine:
    """Runs every incident's escalation on an injected clock."""

    def __init__(
        self,
        clock: Any,
        db: Any,
        channel: Channel,
        *,
        callback_base: str,
        relay_numbers: dict[str, str] | None = None,
    ) -> None:
        self.clock = clock
        self.db = db
        self.channel = channel
        self.callback_base = callback_base.rstrip("/")
        self.relay_numbers = relay_numbers or {"relay_110": "110", "relay_120": "120"}
        self._calls: dict[int, Any] = {}
        self._due: list[int] = []
        self._to_plan: list[int] = []
        self._working = False
        # Set by the app to the SOS committer's when_idle: planning and firing yield to
        # alarms still waiting for their commit, so a burst is acknowledged sooner.
        self.alarms_pending: Callable[[], defer.Deferred[None] | None] | None = None
        self._gauge_loop = task.LoopingCall(self._refresh_gauge)
        self._gauge_loop.clock = clock
        self.on_change: list[Callable[[int, str], None]] = []

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), UTC)

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Install default policies, reschedule stored timers, plan orphaned incidents."""
        await self.db.write(repo.ensure_policies, pol.DEFAULT_POLICIES, self.now())
        for timer_id, due in await self.db.read(repo.pending_timers):
            self._schedule(timer_id, due)
        # Planned in batches, taking turns with the timers that came due while down: a
        # crash during a burst may leave thousands unplanned.
        for incident_id in await self.db.read(repo.unplanned_incidents):
            self.incident_opened(incident_id)
        self._gauge_loop.start(15.0, now=True)

    def stop(self) -> None:
        """Forget the in-memory schedule (the store keeps the truth)."""
        for call in self._calls.values():
            if call.active():
                call.cancel()
        self._calls.clear()
        if self._gauge_loop.running:
            self._gauge_loop.stop()

    async def _refresh_gauge(self) -> None:
        try:
            counts = await self.db.read(repo.open_counts)
        except Exception:
            log.exception("open_counts_failed")
            return
        for kind in pol.KINDS:
            metrics.INCIDENTS_OPEN.labels(kind).set(counts.get(kind, 0))

    # --- planning ---------------------------------------------------------------------

    def incident_opened(self, incident_id: int) -> None:
        """Listener entry point: plan and start escalating (never raises).

        Incidents opened at the same instant (a burst of alarms) are planned together:
        one read and one write per batch instead of two transactions each.
        """
        self._to_plan.append(incident_id)
        self._kick()

    def _kick(self) -> None:
        """Make sure the queued plans and due timers are being worked through."""
        if not self._working:
            self._working = True
            # Next turn, so every timer due (and incident opened) at this instant joins
            # the same batch.
            self.clock.callLater(0, self._drain)

    def _drain(self) -> None:
        d = defer.ensureDeferred(self._work_queued())
        d.addErrback(lambda f: log.error("escalation_work_failed", error=f.getErrorMessage()))

    async def _work_queued(self) -> None:
        # One batch at a time, taking turns while both queues wait.  Planning and firing
        # are writes on the same database (one lock on SQLite): run side by side they
        # contend for it, and a burst of new incidents would hold up the next steps of
        # those already escalating, while a backlog of due timers (a restart, the waves of
        # a burst planned a second ago) would hold up the first call to new incidents.
        # Taking turns bounds each wait to one batch of the other kind.
        timers_turn = True
        try:
            while self._to_plan or self._due:
                await self._alarms_first()
                if self._due and (timers_turn or not self._to_plan):
                    ids, self._due = self._due[:TIMER_BATCH], self._due[TIMER_BATCH:]
                    for fired in await self._fire_batch(ids):
                        self._after_fire(fired)
                    timers_turn = False
                else:
                    ids, self._to_plan = self._to_plan[:PLAN_BATCH], self._to_plan[PLAN_BATCH:]
                    await self._plan_ids(ids)
                    timers_turn = True
        finally:
            self._working = False
            if self._to_plan or self._due:
                # Only an unexpected error ends the loop early: carry on with the rest.
                self._kick()

    async def _alarms_first(self) -> None:
        """Wait (at most ALARMS_FIRST_MAX_S) while SOS frames wait for the store.

        During a burst of 1,000 presses, planning their incidents competed for the CPU
        (one interpreter lock) with committing and acknowledging the presses still
        queued; the terminals' acks matter first, and the plans follow within a second.
        """
        waiting = self.alarms_pending() if self.alarms_pending is not None else None
        if waiting is None:
            return
        waiting.addTimeout(ALARMS_FIRST_MAX_S, self.clock)
        try:
            await waiting
        except defer.TimeoutError:
            log.warning("alarms_first_timeout", waited_s=ALARMS_FIRST_MAX_S)

    async def _plan_ids(self, ids: list[int]) -> None:
        """Plan a batch; if the batch fails, each incident on its own (never raises)."""
        try:
            await self._plan_batch(ids)
            return
        except Exception as exc:
            log.error("plan_batch_failed", incidents=len(ids), error=str(exc))
        for incident_id in ids:  # one by one, so one bad incident blocks nobody
            try:
                await self.start_incident(incident_id)
            except Exception as one:
                # Still open with no plan: the next start() plans it.
                log.error("escalation_start_failed", incident=incident_id, error=str(one))

    async def _plan_batch(self, ids: list[int]) -> None:
        contexts = await self.db.read(repo.start_contexts, ids)
        chosen: dict[Any, tuple[dict | None, pol.Policy]] = {}
        plans = [self._plan(ctx, chosen) for ctx in contexts]
        for timer_id, due in await self.db.write(repo.begin_escalations, plans, self.now()):
            self._schedule(timer_id, due)

    def _plan(
        self,
        ctx: dict[str, Any],
        chosen_for: dict[Any, tuple[dict | None, pol.Policy]] | None = None,
    ) -> tuple[int, dict | None, dict[str, Any]]:
        """(incident id, chosen policy row, plan document) for one incident.

        ``chosen_for`` remembers the choice per candidate set and kind across a batch, so
        each distinct set of policies is parsed and chosen from once, not per incident.
        """
        key = (ctx.get("policy_key"), ctx["kind"])
        if chosen_for is not None and key in chosen_for:
            chosen, policy = chosen_for[key]
        else:
            chosen, policy = _choose(ctx["candidates"], ctx["kind"])
            if chosen_for is not None and ctx.get("policy_key") is not None:
                chosen_for[key] = chosen, policy
        waves = pol.plan(
            policy,
            ctx["kind"],
            _profile(ctx["subscriber"]),
            ctx["contacts"],
            ctx["created_at"],
            self.relay_numbers,
        )
        plan = {
            "waves": [w.to_json() for w in waves],
            "relay_deadline_s": policy.relay_deadline_s,
            "subscriber": ctx["subscriber"],
        }
        return ctx["incident_id"], chosen, plan

    async def start_incident(self, incident_id: int) -> None:
        """Plan one incident from its policy and schedule its first wave now."""
        ctx = await self.db.read(repo.start_context, incident_id)
        if ctx is None:
            return
        _, chosen, plan = self._plan(ctx)
        for timer_id, due in await self.db.write(
            repo.begin_escalation, incident_id, chosen, plan, self.now()
        ):
            self._schedule(timer_id, due)

    # --- timers -----------------------------------------------------------------------

    def _schedule(self, timer_id: int, due: datetime) -> None:
        old = self._calls.pop(timer_id, None)
        if old is not None and old.active():
            old.cancel()
        delay = max(0.0, due.timestamp() - self.clock.seconds())
        self._calls[timer_id] = self.clock.callLater(delay, self._fire, timer_id)

    def _fire(self, timer_id: int) -> None:
        """A timer came due: queue it; due timers are fired in shared transactions."""
        self._calls.pop(timer_id, None)
        # Many incidents come due together (a burst of alarms, a restart): one transaction
        # per batch instead of one per timer, each row still claimed exactly once.
        self._due.append(timer_id)
        self._kick()

    async def _fire_batch(self, ids: list[int]) -> list[repo.Fired]:
        try:
            return await self.db.write(repo.fire_timers, ids, self.now())
        except Exception as exc:
            log.error("timer_batch_failed", timers=len(ids), error=str(exc))
        if len(ids) > 1:
            # One bad row must not hold the others back: fire them one by one.
            fired: list[repo.Fired] = []
            for timer_id in ids:
                fired += await self._fire_batch([timer_id])
            return fired
        # Still pending in the store, so nothing is lost: try this one again shortly.
        self._calls[ids[0]] = self.clock.callLater(1.0, self._fire, ids[0])
        return []

    def _after_fire(self, fired: repo.Fired) -> None:
        for new_id, due in fired.timers:
            self._schedule(new_id, due)
        if fired.late:
            metrics.ESCALATION_LATE.inc()
        if fired.attempts:
            self._changed(fired.incident_id, "notified")
            for attempt in fired.attempts:
                d = defer.ensureDeferred(self._send(fired, attempt))
                d.addErrback(lambda f: log.error("send_failed", error=f.getErrorMessage()))

    async def _send(self, fired: repo.Fired, attempt: dict[str, Any]) -> None:
        ctx = fired.context or {}
        sub = ctx.get("subscriber") or {}
        where = f" at {sub['address']}" if sub.get("address") else ""
        message = MESSAGES.get(ctx.get("kind", "sos"), MESSAGES["sos"]).format(
            name=sub.get("name", "A subscriber"), where=where
        )
        request = CallRequest(
            type="relay"
            if attempt["channel"] == "relay"
            else ("sms" if attempt["channel"] == "sms" else "call"),
            attempt_id=attempt["id"],
            incident_id=fired.incident_id,
            incident_kind=ctx.get("kind", "sos"),
            tier=attempt["tier"],
            channel=attempt["channel"],
            phone=attempt["phone"],
            name=attempt["name"],
            relation=attempt.get("relation"),
            subscriber=dict(sub, location=ctx.get("location")) if sub else None,
            message=message,
            callback_url=f"{self.callback_base}/api/v1/callbacks/{attempt['id']}",
            expires_at=(self.now() + timedelta(hours=1)).isoformat(),
        )
        created = ctx.get("created_at")
        if created is not None:
            metrics.FIRST_NOTIFICATION_SECONDS.observe(
                max(0.0, self.clock.seconds() - created.timestamp())
            )
        ok = await self.channel.send(request)
        if ok:
            metrics.ATTEMPTS.labels(attempt["tier"], "sent").inc()
            return
        metrics.ATTEMPTS.labels(attempt["tier"], "failed").inc()
        try:
            await self.answer(attempt["id"], "failed", None)
        except Exception as exc:  # already answered or closed meanwhile: nothing to do
            log.info("failed_attempt_not_recorded", attempt=attempt["id"], error=str(exc))

    # --- answers and operator actions ---------------------------------------------------

    async def answer(self, attempt_id: str, answer: str, responder: str | None) -> dict:
        """Apply a responder's accept/decline (or a channel failure)."""
        result = await self.db.write(repo.answer_attempt, attempt_id, answer, responder, self.now())
        for timer_id, due in result["timers"]:
            self._schedule(timer_id, due)
        if answer != "failed":
            metrics.ATTEMPTS.labels(result["tier"], result["result"]).inc()
        if result["result"] == "accepted":
            metrics.ACCEPTANCE_SECONDS.observe(
                max(0.0, self.clock.seconds() - result["created_at"].timestamp())
            )
        self._changed(result["incident_id"], result["result"])
        return result

    async def operator(self, incident_id: int, action: str, actor: str, **kw: Any) -> dict:
        """Apply an operator's action and reschedule what it created."""
        result = await self.db.write(
            repo.operator_action,
            incident_id,
            action,
            actor,
            self.now(),
            kw.get("outcome"),
            kw.get("text"),
        )
        for timer_id, due in result["timers"]:
            self._schedule(timer_id, due)
        if action == "acknowledge":
            metrics.ACCEPTANCE_SECONDS.observe(
                max(0.0, self.clock.seconds() - result["created_at"].timestamp())
            )
        self._changed(incident_id, action)
        return result

    def _changed(self, incident_id: int, what: str) -> None:
        for listener in self.on_change:
            try:
                listener(incident_id, what)
            except Exception:
                log.exception("change_listener_failed", incident=incident_id)
