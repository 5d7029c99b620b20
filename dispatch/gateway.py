"""The gateway: what the server does with each terminal event, whatever the protocol.

Transports hand every decoded event here with the link it came on; the
gateway answers with an :class:`Outcome` the transport encodes as that
protocol's ack or nack.  Heartbeats are answered from memory; an SOS is
answered only after the store has committed it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol

from twisted.internet import defer

from dispatch import events as ev
from dispatch import logs, metrics
from dispatch.livestate import DeviceLive, LiveState, utc
from dispatch.protocol.base import Inbound, Outcome
from dispatch.sos_commit import SosCommitter
from dispatch.store import devices as device_repo
from dispatch.store import incidents as incident_repo
from dispatch.store.devices import DeviceInfo

log = logs.get(__name__)


class TerminalLink(Protocol):
    """One way of reaching one terminal: a TCP connection or a UDP peer address."""

    protocol: str
    peer: str
    device: DeviceInfo | None

    def send_command(self, command: ev.Command) -> bool:
        """Send a server command; False if the protocol cannot carry it."""
        ...

    def close(self, reason: str) -> None:
        """Drop the link (a TCP link closes its connection)."""
        ...


IncidentListener = Callable[[incident_repo.SosRecord, ev.Sos, DeviceInfo], None]


class Gateway:
    """Session binding, live state and the SOS write path."""

    def __init__(
        self,
        clock: Any,
        db: Any,
        live: LiveState,
        *,
        heartbeat_interval: int = 60,
        sos_dedup: timedelta = timedelta(hours=24),
        low_battery: int = 20,
    ) -> None:
        self.clock = clock
        self.db = db
        self.live = live
        self.heartbeat_interval = heartbeat_interval
        self.sos_dedup = sos_dedup
        self.links: dict[str, TerminalLink] = {}
        self._frame_counters: dict[tuple[str, str], Any] = {}
        self.sos_committer = SosCommitter(db, sos_dedup)
        self.incident_listeners: list[IncidentListener] = []
        self.care_listeners: list[Callable[[ev.CareCheckAnswer, DeviceInfo], None]] = []
        self.battery_listeners: list[Callable[[str, int], None]] = []
        self.low_battery = low_battery

    # --- entry point ----------------------------------------------------------------

    def handle(
        self, link: TerminalLink, inbound: Inbound
    ) -> Outcome | defer.Deferred[Outcome] | None:
        """Act on one event; returns the outcome to encode (a Deferred when it needs the store)."""
        event = inbound.event
        kind = type(event).__name__
        counter = self._frame_counters.get((link.protocol, kind))
        if counter is None:  # labels() costs a lock and a dict build: once per pair, not frame
            counter = self._frame_counters[(link.protocol, kind)] = metrics.FRAMES.labels(
                link.protocol, kind
            )
        counter.inc()
        if isinstance(event, ev.Login):
            return defer.ensureDeferred(self._login(link, event))
        if isinstance(event, ev.Register):
            return defer.ensureDeferred(self._register(link, event))
        device = link.device
        if device is None or (event.ident and event.ident != device.ident):
            return self._reject(link, ev.Reject.NOT_LOGGED_IN, kind)
        now = self.clock.seconds()
        d = self.live.seen(device.id, device.ident, now)
        if isinstance(event, ev.Heartbeat):
            self._check_battery(device.ident, d, event.battery)
            self.live.heartbeat(d, event.battery, event.charging, event.signal, event.location)
            return Outcome.accept(now)
        if isinstance(event, ev.Sos):
            return defer.ensureDeferred(self._sos(device, d, event, now))
        return self._other(link, device, d, event, now)

    def _check_battery(self, ident: str, d: DeviceLive, battery: int | None) -> None:
        """Tell listeners once per crossing below the threshold, not on every frame."""
        if battery is None or battery >= self.low_battery:
            return
        if d.battery is not None and d.battery < self.low_battery:
            return
        for listener in self.battery_listeners:
            try:
                listener(ident, battery)
            except Exception:
                log.exception("battery_listener_failed", ident=ident)

    def _reject(self, link: TerminalLink, reason: ev.Reject, kind: str) -> Outcome:
        metrics.REJECTS.labels(link.protocol, reason.name.lower()).inc()
        log.info(
            "frame_rejected", protocol=link.protocol, peer=link.peer, reason=reason.name, type=kind
        )
        return Outcome.reject(reason, self.clock.seconds())

    # --- login ----------------------------------------------------------------------

    async def _lookup(self, link: TerminalLink, ident: str) -> DeviceInfo | None:
        info = await self.db.read(device_repo.device_for_login, ident)
        if info is None:
            metrics.REJECTS.labels(link.protocol, "unknown_device").inc()
            log.warning("login_unknown_device", protocol=link.protocol, peer=link.peer, ident=ident)
        elif info.protocol != link.protocol:
            log.warning(
                "login_protocol_mismatch", ident=ident, registered=info.protocol, used=link.protocol
            )
        return info

    async def _login(self, link: TerminalLink, event: ev.Login) -> Outcome:
        try:
            info = await self._lookup(link, event.ident)
        except Exception:
            metrics.DB_ERRORS.labels("login").inc()
            log.exception("login_lookup_failed", ident=event.ident)
            return Outcome.reject(ev.Reject.TRY_LATER, self.clock.seconds())
        if info is None:
            return Outcome.reject(ev.Reject.UNKNOWN_DEVICE, self.clock.seconds())
        if info.auth_code and event.auth_code is not None and event.auth_code != info.auth_code:
            return self._reject(link, ev.Reject.UNKNOWN_DEVICE, "Login")
        now = self.clock.seconds()
        self.bind(link, info)
        # No write of its own: after a restart every terminal logs in again, and a
        # transaction per login made that storm ~325 logins/s.  The batched flush
        # stores online, last_seen, firmware and protocol version.
        d = self.live.seen(info.id, info.ident, now)
        self.live.logged_in(d, event.firmware, event.protocol_version)
        self.live.log_event(
            {
                "at": utc(now),
                "kind": "login",
                "device_ident": info.ident,
                "subscriber_id": info.subscriber_id,
                "incident_id": None,
                "data": {"protocol": link.protocol, "firmware": event.firmware},
            }
        )
        log.info("login", protocol=link.protocol, peer=link.peer, ident=info.ident)
        return Outcome.accept(now)

    async def _register(self, link: TerminalLink, event: ev.Register) -> Outcome:
        info = await self._lookup(link, event.ident)
        if info is None:
            return Outcome.reject(ev.Reject.UNKNOWN_DEVICE, self.clock.seconds())
        code = info.auth_code or secrets.token_hex(6)
        if info.auth_code is None:
            await self.db.write(device_repo.set_auth_code, info.id, code)
        return Outcome.accept(self.clock.seconds(), auth_code=code)

    def bind(self, link: TerminalLink, info: DeviceInfo) -> None:
        """Attach ``link`` to a device; a previous link of that device is closed."""
        old = self.links.get(info.ident)
        link.device = info
        self.links[info.ident] = link
        if old is not None and old is not link:
            old.device = None
            old.close("replaced")
            log.info("session_replaced", ident=info.ident, old_peer=old.peer, new_peer=link.peer)

    def unbind(self, link: TerminalLink) -> None:
        """Forget ``link`` (connection lost); a newer link of the device is kept."""
        if link.device is not None and self.links.get(link.device.ident) is link:
            del self.links[link.device.ident]

    def after_login(self, link: TerminalLink) -> None:
        """Push settings once the login ack is on the wire."""
        if link.device is not None:
            link.send_command(ev.Settings(self.heartbeat_interval, link.device.contact_numbers[:5]))

    # --- SOS ------------------------------------------------------------------------

    async def _sos(self, device: DeviceInfo, d: DeviceLive, event: ev.Sos, now: float) -> Outcome:
        if event.battery is not None:
            self._check_battery(device.ident, d, event.battery)
            self.live.set_battery(d, event.battery)
        loc = event.location
        if loc is not None:
            self.live.locate(d, loc)
        record_in = incident_repo.SosInput(
            device_id=device.id,
            device_ident=device.ident,
            subscriber_id=device.subscriber_id,
            seq=event.seq,
            kind="fall" if event.trigger == ev.SosTrigger.FALL else "sos",
            terminal_time=int(event.terminal_time) if event.terminal_time else None,
            received_at=utc(now),
            lat=loc.lat if loc else None,
            lon=loc.lon if loc else None,
            accuracy_m=loc.accuracy_m if loc else None,
            detail={
                "trigger": event.trigger.name.lower(),
                "battery": event.battery,
                "terminal_time": event.terminal_time,
            },
        )
        try:
            record = await self.sos_committer.submit(record_in)
        except Exception:
            # No ack: the terminal keeps resending and we try again with the next copy.
            metrics.DB_ERRORS.labels("sos").inc()
            metrics.SOS_TOTAL.labels("store_failed").inc()
            log.exception("sos_store_failed", ident=device.ident, seq=event.seq)
            return Outcome.reject(ev.Reject.TRY_LATER, self.clock.seconds())
        result = "duplicate" if record.duplicate else ("new" if record.created else "joined")
        metrics.SOS_TOTAL.labels(result).inc()
        log.warning(
            "sos",
            ident=device.ident,
            seq=event.seq,
            incident=record.incident_id,
            result=result,
            trigger=event.trigger.name.lower(),
        )
        if not record.duplicate:
            for listener in self.incident_listeners:
                try:
                    listener(record, event, device)
                except Exception:
                    log.exception("incident_listener_failed", incident=record.incident_id)
        return Outcome.accept(self.clock.seconds())

    # --- everything else ------------------------------------------------------------

    def _other(
        self, link: TerminalLink, device: DeviceInfo, d: DeviceLive, event: Any, now: float
    ) -> Outcome | None:
        if isinstance(event, ev.LocationReport):
            self.live.locate(d, event.location)
        elif isinstance(event, ev.CareCheckAnswer):
            self._log(
                now,
                "care_answer",
                device,
                {"round_id": event.round_id, "answer": event.answer.name.lower()},
            )
            for listener in self.care_listeners:
                listener(event, device)
        elif isinstance(event, ev.DeviceAlarm):
            self._log(now, "device_alarm", device, {"alarm": event.alarm})
        elif isinstance(event, ev.Logout):
            self._log(now, "logout", device, None)
            self.live.go_offline(d, "logout")
        elif isinstance(event, ev.CommandAck):
            log.debug("command_ack", ident=device.ident, ref_seq=event.ref_seq, ok=event.ok)
            return None
        return Outcome.accept(now)

    def _log(self, now: float, kind: str, device: DeviceInfo, data: dict | None) -> None:
        self.live.log_event(
            {
                "at": utc(now),
                "kind": kind,
                "device_ident": device.ident,
                "subscriber_id": device.subscriber_id,
                "incident_id": None,
                "data": data,
            }
        )
