"""Live device state in memory, flushed to the store in batches.

A heartbeat changes a few fields of one object; nothing touches the database
per frame.  A device becomes dirty when something an operator or a later
restart needs changes (online/offline, login details, battery, charging, a
position) or when its stored ``last_seen`` is older than ``persist_every_s``:
at 300,000 terminals a row per heartbeat would be 5,000 row updates a second
for nothing, since offline detection runs on memory.  :class:`LiveStateFlusher`
writes the dirty rows every ``flush_interval`` seconds in chunks, so an SOS
transaction never waits behind a long flush, and the offline sweep runs on the
same timer.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from twisted.internet import defer, task

from dispatch import logs, metrics
from dispatch.events import Location
from dispatch.store import devices as device_repo

log = logs.get(__name__)

CHUNK = 500
PERSIST_EVERY_S = 300.0


def utc(ts: float) -> datetime:
    """Epoch seconds to an aware UTC datetime."""
    return datetime.fromtimestamp(ts, UTC)


class DeviceLive:
    """Mutable live fields of one device."""

    __slots__ = (
        "device_id",
        "ident",
        "online",
        "last_seen",
        "battery",
        "signal",
        "charging",
        "lat",
        "lon",
        "firmware",
        "protocol_version",
        "persisted_seen",
        "dirty",
    )

    def __init__(self, device_id: int, ident: str) -> None:
        self.device_id = device_id
        self.ident = ident
        self.online = False
        self.last_seen = 0.0
        self.battery: int | None = None
        self.signal: int | None = None
        self.charging: bool | None = None
        self.lat: float | None = None
        self.lon: float | None = None
        # Login details are None until this process sees a login (a device restored at
        # start-up keeps what the store has).
        self.firmware: str | None = None
        self.protocol_version: int | None = None
        self.persisted_seen = 0.0
        self.dirty = False

    def row(self) -> dict[str, Any]:
        """The columns a flush writes (login details only once known)."""
        row = {
            "id": self.device_id,
            "online": self.online,
            "last_seen": utc(self.last_seen) if self.last_seen else None,
            "battery": self.battery,
            "signal": self.signal,
            "charging": self.charging,
            "lat": self.lat,
            "lon": self.lon,
        }
        if self.protocol_version is not None:
            row["firmware"] = self.firmware or None
            row["protocol_version"] = self.protocol_version
        return row

    def view(self) -> dict[str, Any]:
        """The known live fields in the API's device shape (fresher than the stored row).

        Fields this process has not seen yet (a device restored at start-up has no
        battery reading until its first heartbeat) are left out, so the stored value
        shows through.
        """
        known: dict[str, Any] = {"online": self.online}
        if self.last_seen:
            known["last_seen"] = utc(self.last_seen).isoformat()
        for name in ("battery", "signal", "charging", "firmware"):
            value = getattr(self, name)
            if value is not None:
                known[name] = value
        if self.lat is not None:
            known["location"] = {"lat": self.lat, "lon": self.lon}
        return known


class LiveState:
    """Every logged-in (or recently seen) device's live fields, keyed by ident."""

    def __init__(self, offline_after_s: float, persist_every_s: float = PERSIST_EVERY_S) -> None:
        self.offline_after_s = offline_after_s
        self.persist_every_s = persist_every_s
        self._devices: dict[str, DeviceLive] = {}
        self._dirty: dict[str, DeviceLive] = {}
        self._events: list[dict[str, Any]] = []
        self.online_count = 0
        self.on_offline: list[Callable[[DeviceLive, str], None]] = []

    def get(self, ident: str) -> DeviceLive | None:
        """The live record of ``ident`` if the server has seen it since start."""
        return self._devices.get(ident)

    def _mark(self, d: DeviceLive) -> None:
        if not d.dirty:
            d.dirty = True
            self._dirty[d.ident] = d

    def seen(self, device_id: int, ident: str, now: float) -> DeviceLive:
        """Record activity from a device; it is online from now.

        The row is marked for writing when the device comes online or its stored
        ``last_seen`` is ``persist_every_s`` old, not on every frame.
        """
        d = self._devices.get(ident)
        if d is None:
            d = self._devices[ident] = DeviceLive(device_id, ident)
        d.last_seen = now
        if not d.online:
            d.online = True
            self.online_count += 1
            metrics.SESSIONS_ONLINE.set(self.online_count)
            self._mark(d)
        elif now - d.persisted_seen >= self.persist_every_s:
            self._mark(d)
        return d

    def logged_in(self, d: DeviceLive, firmware: str, protocol_version: int) -> None:
        """Keep a login's details for the next flush (the login itself writes nothing)."""
        d.firmware = firmware or None
        d.protocol_version = protocol_version
        self._mark(d)

    def heartbeat(
        self,
        d: DeviceLive,
        battery: int | None,
        charging: bool,
        signal: int | None,
        location: Location | None,
    ) -> None:
        """Apply a heartbeat's fields (unknown values keep the last known ones).

        A change of battery, charging or position marks the row for writing; the
        signal alone does not (it wobbles from beat to beat and is written along
        with the next row that is).
        """
        changed = charging is not d.charging
        if battery is not None and battery != d.battery:
            d.battery = battery
            changed = True
        if signal is not None:
            d.signal = signal
        d.charging = charging
        if location is not None and (location.lat != d.lat or location.lon != d.lon):
            d.lat, d.lon = location.lat, location.lon
            changed = True
        if changed:
            self._mark(d)

    def set_battery(self, d: DeviceLive, battery: int) -> None:
        """Record a battery level reported outside a heartbeat (an SOS frame)."""
        if battery != d.battery:
            d.battery = battery
            self._mark(d)

    def locate(self, d: DeviceLive, location: Location) -> None:
        """Record a position report."""
        d.lat, d.lon = location.lat, location.lon
        self._mark(d)

    def go_offline(self, d: DeviceLive, reason: str = "silent") -> None:
        """Mark a device offline now (``reason``: silent, logout)."""
        if d.online:
            d.online = False
            self.online_count -= 1
            metrics.SESSIONS_ONLINE.set(self.online_count)
            self._mark(d)
            for callback in self.on_offline:
                callback(d, reason)

    def restore(self, device_id: int, ident: str, last_seen: float, now: float) -> None:
        """Load a device the store believes online, so silence still takes it offline.

        The stored ``last_seen`` may be up to ``persist_every_s`` older than the
        device's last frame, so it counts as seen that much later (never after
        ``now``): a restart must not take live terminals offline early.
        """
        d = self._devices.setdefault(ident, DeviceLive(device_id, ident))
        d.last_seen = min(now, last_seen + self.persist_every_s)
        d.persisted_seen = last_seen
        if not d.online:
            d.online = True
            self.online_count += 1
            metrics.SESSIONS_ONLINE.set(self.online_count)

    def sweep(self, now: float) -> list[DeviceLive]:
        """Take every device silent for longer than the offline threshold offline."""
        limit = now - self.offline_after_s
        gone = [d for d in self._devices.values() if d.online and d.last_seen < limit]
        for d in gone:
            self.go_offline(d)
        return gone

    def log_event(self, row: dict[str, Any]) -> None:
        """Queue an event-log row for the next flush."""
        self._events.append(row)

    def requeue(self, rows: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
        """Put back what a failed flush could not write."""
        ids = {r["id"] for r in rows}
        for d in self._devices.values():
            if d.device_id in ids:
                self._mark(d)
        self._events[:0] = events

    def take(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Hand over dirty device rows and queued events, clearing both."""
        rows = [d.row() for d in self._dirty.values()]
        for d in self._dirty.values():
            d.dirty = False
            d.persisted_seen = d.last_seen
        self._dirty = {}
        events, self._events = self._events, []
        return rows, events


class LiveStateFlusher:
    """Periodically sweep for silent devices and write dirty state in chunks."""

    def __init__(self, clock: Any, db: Any, live: LiveState, interval: float) -> None:
        self.clock = clock
        self.db = db
        self.live = live
        self.interval = interval
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = clock
        self._running: defer.Deferred[None] | None = None

    def start(self) -> None:
        """Begin ticking every ``interval`` seconds."""
        self._loop.start(self.interval, now=False)

    def stop(self) -> defer.Deferred[None]:
        """Stop ticking and write what is still dirty."""
        if self._loop.running:
            self._loop.stop()
        return defer.ensureDeferred(self.flush())

    def tick(self) -> defer.Deferred[None] | None:
        """One timer tick; skipped if the previous flush is still writing."""
        if self._running is not None:
            return None
        self.live.sweep(self.clock.seconds())
        self._running = defer.ensureDeferred(self.flush())

        def done(_: Any) -> None:
            self._running = None

        self._running.addBoth(done)
        return None

    async def flush(self) -> None:
        """Write dirty rows and queued events; failures put the rows back for next time."""
        rows, events = self.live.take()
        if not rows and not events:
            return
        started = self.clock.seconds()
        try:
            # Not durable: a power cut may lose the last few seconds of live state, which
            # the terminals resend anyway; an fsync per chunk made SOS commits wait.
            dialect = getattr(self.db, "sql_dialect", None)
            for i in range(0, len(rows), CHUNK):
                chunk = device_repo.prepare_live(rows[i : i + CHUNK], dialect)
                await self.db.write(device_repo.flush_live, chunk, durable=False)
            if events:
                await self.db.write(device_repo.append_events, events, durable=False)
        except Exception:
            metrics.DB_ERRORS.labels("live_flush").inc()
            log.exception("live_flush_failed", rows=len(rows), events=len(events))
            self.live.requeue(rows, events)
            return
        metrics.FLUSH_ROWS.inc(len(rows))
        metrics.FLUSH_SECONDS.observe(self.clock.seconds() - started)
