"""Active care: the round scheduler and silence detection, on an injected clock.

Every ``lookahead_s`` the scheduler reads the rounds that need action soon (an
index range) and sets one reactor timer per round.  Firing a round prompts an
online native terminal, or calls the subscriber by voice through the channel
when the terminal cannot be prompted or is offline.  Answers close rounds;
expired answer windows retry and finally open ``care_missed`` incidents, which
the escalation engine works like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet import defer, task

from dispatch import events as ev
from dispatch import logs, metrics
from dispatch.routing import care_schedule as cs
from dispatch.routing.channels import CallRequest, Channel
from dispatch.store import care as repo
from dispatch.store.errors import StoreError

log = logs.get(__name__)

# Only these protocols carry a care prompt *and* a structured answer (docs/protocols.md).
PROMPTABLE = frozenset({"native"})
CALLBACK_PREFIX = "care-"


@dataclass(frozen=True)
class CareConfig:
    """Scheduler knobs (defaults documented in docs/care.md)."""

    lookahead_s: float = 60.0
    plan_every_s: float = 300.0
    plan_batch: int = 5000
    silence_every_s: float = 60.0
    offline_after_s: float = 2 * 3600.0
    inactivity_days: float = 7.0
    inactivity_every_s: float = 3600.0
    late_after_s: float = 2.0


def plan_for(inputs: dict[str, Any]) -> cs.CarePlan:
    """Profile default, then the district's document, then the subscriber's."""
    plan = cs.default_plan(inputs.get("living_situation"))
    for key in ("district_doc", "subscriber_doc"):
        if inputs.get(key):
            try:
                plan = cs.parse_plan(inputs[key], plan)
            except cs.CarePlanError:
                log.error(
                    "stored_care_plan_invalid", scope=key, subscriber=inputs.get("subscriber_id")
                )
    return plan


def _row_for(inputs: dict[str, Any], after: datetime) -> dict[str, Any] | None:
    """The next scheduled round for one subscriber after ``after`` (None: none in horizon)."""
    plan = plan_for(inputs)
    due = cs.next_due(plan, inputs["subscriber_id"], after)
    if due is None:
        return None
    return {
        "subscriber_id": inputs["subscriber_id"],
        "district": inputs["district"],
        "reason": "schedule",
        "due_at": due.astimezone(UTC),
        "params": _params(plan),
    }


def _params(plan: cs.CarePlan) -> dict[str, int]:
    return {
        "answer_window_s": plan.answer_window_s,
        "retries": plan.retries,
        "retry_spacing_s": plan.retry_spacing_s,
    }


class CareScheduler:
    """Plans, prompts, retries and misses care rounds; detects silent terminals."""

    def __init__(
        self,
        clock: Any,
        db: Any,
        gateway: Any,
        channel: Channel,
        engine: Any,
        *,
        callback_base: str,
        config: CareConfig | None = None,
    ) -> None:
        self.clock = clock
        self.db = db
        self.gateway = gateway
        self.channel = channel
        self.engine = engine
        self.callback_base = callback_base
        self.config = config or CareConfig()
        self._timers: dict[int, Any] = {}
        self._loops: list[task.LoopingCall] = []

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), UTC)

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Begin the periodic jobs (each also runs once now)."""
        c = self.config
        for fn, every in (
            (self.plan_missing, c.plan_every_s),
            (self.refill, c.lookahead_s),
            (self.detect_silence, c.silence_every_s),
        ):
            self._loop(fn, every, now=True)
        # Not at start: a restart should not set off a burst of inactivity calls.
        self._loop(self.detect_inactivity, c.inactivity_every_s, now=False)

    def _loop(self, fn: Any, every: float, now: bool) -> None:
        loop = task.LoopingCall(self._guard, fn)
        loop.clock = self.clock
        loop.start(every, now=now)
        self._loops.append(loop)

    def stop(self) -> None:
        """Cancel timers and loops (the store keeps every round)."""
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops.clear()
        for call in self._timers.values():
            if call.active():
                call.cancel()
        self._timers.clear()

    def _guard(self, fn: Any) -> defer.Deferred[None]:
        d = defer.ensureDeferred(fn())
        d.addErrback(
            lambda f: log.error("care_job_failed", job=fn.__name__, error=f.getErrorMessage())
        )
        return d

    # --- planning ---------------------------------------------------------------------

    async def plan_missing(self) -> int:
        """Give every active subscriber without a pending round its next one."""
        total, after_id = 0, 0
        while True:
            # Keyset pages: someone with no due date in the horizon (a long pause) is
            # passed over this run instead of being fetched again and again.
            batch = await self.db.read(repo.unplanned, self.config.plan_batch, after_id)
            if not batch:
                await self.refill()
                return total
            after_id = batch[-1]["subscriber_id"]
            total += len(await self._plan(batch))

    async def plan_one(self, subscriber_id: int) -> int:
        """Plan one subscriber's next round (after a round ends): no scan of everyone."""
        rows = await self.db.write(repo.plan_next, subscriber_id, self.now(), _row_for)
        soon = self.now() + timedelta(seconds=self.config.lookahead_s)
        if any(r["due_at"] <= soon for r in rows):
            await self.refill()
        return len(rows)

    async def _plan(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        now = self.now()
        last = await self.db.read(repo.last_due, [b["subscriber_id"] for b in batch])
        rows = [
            _row_for(inputs, max(now, last.get(inputs["subscriber_id"], now))) for inputs in batch
        ]
        rows = [r for r in rows if r is not None]
        await self.db.write(repo.insert_rounds, rows)
        return rows

    async def check_now(self, subscriber_id: int, reason: str = "manual") -> int:
        """Put a care check to the subscriber now (an operator's request, inactivity)."""
        inputs = await self.db.read(repo.plan_inputs, subscriber_id)
        row = {
            "subscriber_id": subscriber_id,
            "district": inputs["district"],
            "reason": reason,
            "due_at": self.now(),
            "params": _params(plan_for(inputs)),
        }
        [round_id] = await self.db.write(repo.insert_rounds_returning, [row])
        self._schedule(round_id, row["due_at"])
        return round_id

    async def replan(self, subscriber_id: int) -> None:
        """After a plan change: plan this subscriber's next round now."""
        await self.plan_one(subscriber_id)
        await self.refill()

    # --- timers -----------------------------------------------------------------------

    async def refill(self) -> None:
        """Set a timer for every round needing action within the lookahead."""
        until = self.now() + timedelta(seconds=self.config.lookahead_s)
        for round_id, at, ident in await self.db.read(repo.due_rounds, until, 100_000):
            self._schedule(round_id, at, ident)

    def _schedule(self, round_id: int, at: datetime, ident: str | None = None) -> None:
        if round_id in self._timers and self._timers[round_id].active():
            self._timers[round_id].cancel()
        delay = max(0.0, at.timestamp() - self.clock.seconds())
        self._timers[round_id] = self.clock.callLater(delay, self._fire, round_id, at, ident)

    def _fire(self, round_id: int, at: datetime, ident: str | None) -> defer.Deferred[None]:
        self._timers.pop(round_id, None)
        metrics.CARE_LAG_SECONDS.observe(max(0.0, self.clock.seconds() - at.timestamp()))
        return self._guard(lambda: self._act(round_id, ident))

    def _prompt_link(self, ident: str | None) -> Any:
        """The link to prompt on, if the terminal is online and can carry a care check."""
        link = self.gateway.links.get(ident) if ident else None
        return link if link is not None and link.protocol in PROMPTABLE else None

    async def _act(self, round_id: int, ident: str | None = None) -> None:
        # Decided here, on the reactor thread, so the claim records it in one transaction.
        guess = None if ident is None else ("terminal" if self._prompt_link(ident) else "voice")
        todo = await self.db.write(
            repo.act, round_id, self.now(), timedelta(seconds=self.config.late_after_s), guess
        )
        if todo is None:
            return
        if todo["do"] == "prompt":
            await self._prompt(todo)
        elif todo["do"] == "wait":
            self._schedule(round_id, todo["at"], ident)
        elif todo["do"] == "retry":
            metrics.CARE_ROUNDS.labels("retried").inc()
            self._schedule(round_id, todo["at"], ident)
        elif todo["do"] == "missed":
            metrics.CARE_ROUNDS.labels("missed").inc()
            log.warning("care_missed", round=round_id, incident=todo["incident_id"])
            self.engine.incident_opened(todo["incident_id"])
            await self.plan_one(todo["subscriber_id"])

    async def _prompt(self, todo: dict[str, Any]) -> None:
        metrics.CARE_ROUNDS.labels("prompted").inc()
        self._schedule(todo["round_id"], todo["deadline"], todo["device_ident"])
        link = self._prompt_link(todo["device_ident"])
        if link is not None:
            prompt = ev.CarePrompt(
                todo["round_id"], pattern=3, window_s=todo["params"]["answer_window_s"]
            )
            if link.send_command(prompt):
                if todo["channel"] != "terminal":
                    await self.db.write(repo.set_channel, todo["round_id"], "terminal")
                return
        if todo["channel"] != "voice":
            await self.db.write(repo.set_channel, todo["round_id"], "voice")
        if not todo["phone"]:
            log.warning("care_unreachable", round=todo["round_id"], reason="no phone")
            return  # the answer window expires and the round is retried, then missed
        await self.channel.send(
            CallRequest(
                type="call",
                attempt_id=CALLBACK_PREFIX + todo["token"],
                incident_id=0,
                incident_kind="care_check",
                tier="care",
                channel="voice",
                phone=todo["phone"],
                name=todo["name"],
                relation="self",
                subscriber={
                    "id": todo["subscriber_id"],
                    "name": todo["name"],
                    "address": todo["address"],
                    "district": todo["district"],
                },
                message=f"{todo['name']}, this is your daily care call. Press 1 if you are well, "
                "2 if you need help.",
                callback_url=f"{self.callback_base}/api/v1/callbacks/{CALLBACK_PREFIX}{todo['token']}",
                expires_at=todo["deadline"].isoformat(),
            )
        )

    # --- answers ----------------------------------------------------------------------

    def terminal_answer(self, event: ev.CareCheckAnswer, device: Any) -> None:
        """Gateway listener: a native terminal answered a prompt."""
        value = {ev.CareAnswer.OK: "ok", ev.CareAnswer.HELP: "help"}.get(event.answer, "no_input")
        self._guard(lambda: self._answer(event.round_id, None, value, device.subscriber_id))

    async def callback_answer(self, token: str, answer: str) -> dict[str, Any]:
        """A care call's answer through the signed callback (accept/ok → ok, else help)."""
        value = "ok" if answer in ("accept", "ok") else "help"
        return await self._answer(None, token, value, None)

    async def _answer(
        self, round_id: int | None, token: str | None, value: str, subscriber_id: int | None
    ) -> dict[str, Any]:
        try:
            result = await self.db.write(
                repo.answer, round_id, token, value, self.now(), subscriber_id
            )
        except StoreError as exc:
            # An answer for an unknown or closed round: logged and ignored, never a crash.
            log.info("care_answer_ignored", round=round_id, reason=str(exc))
            if token is not None:
                raise
            return {"result": "ignored"}
        if result.get("act_now"):
            self._schedule(result["round_id"], self.now())
            return result
        metrics.CARE_ROUNDS.labels("answered").inc()
        if result["incident_id"] is not None:
            log.warning("care_help", round=result["round_id"], incident=result["incident_id"])
            self.engine.incident_opened(result["incident_id"])
        await self.plan_one(result["subscriber_id"])
        return result

    # --- silence ----------------------------------------------------------------------

    async def detect_silence(self) -> None:
        """Terminals offline longer than ``offline_after_s`` → ``offline`` incidents."""
        now = self.now()
        before = now - timedelta(seconds=self.config.offline_after_s)
        for incident_id in await self.db.write(repo.silent_devices, before, now, 1000):
            log.info("device_silent", incident=incident_id)
            self.engine.incident_opened(incident_id)

    async def detect_inactivity(self) -> None:
        """No button press and no care answer for ``inactivity_days``: a check call now."""
        now = self.now()
        since = now - timedelta(days=self.config.inactivity_days)
        for sid in await self.db.read(repo.inactive, since, now, 1000):
            log.info("subscriber_inactive", subscriber=sid)
            await self.check_now(sid, "inactivity")

    def battery_low(self, device_ident: str, battery: int) -> None:
        """Gateway listener: a terminal's battery fell below the threshold."""

        async def run() -> None:
            incident_id = await self.db.write(repo.low_battery, device_ident, battery, self.now())
            if incident_id is not None:
                self.engine.incident_opened(incident_id)

        self._guard(run)
