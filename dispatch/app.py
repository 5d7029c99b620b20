"""Wiring: build every service from the configuration and start the listeners."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from twisted.internet import threads
from twisted.web import server

from dispatch import logs
from dispatch.bus import QueueBus
from dispatch.config import Config
from dispatch.gateway import Gateway
from dispatch.http import care_api, escalation_api
from dispatch.http.api import ALL, Api, build_site_root
from dispatch.http.stream import open_stream
from dispatch.livestate import DeviceLive, LiveState, LiveStateFlusher, utc
from dispatch.protocol.base import StreamCodec
from dispatch.protocol.native import NativeCodec
from dispatch.protocol.native_udp import NativeDatagramProtocol
from dispatch.protocol.transport import TerminalStreamFactory
from dispatch.routing.care import CareConfig, CareScheduler
from dispatch.routing.channels import Channel, LogChannel, WebhookChannel
from dispatch.routing.engine import EscalationEngine
from dispatch.store import db as dbmod
from dispatch.store import devices as device_repo

log = logs.get(__name__)


def codec_factories() -> dict[str, Callable[[], StreamCodec]]:
    """Codec constructors for every TCP protocol this build knows."""
    factories: dict[str, Callable[[], StreamCodec]] = {"native": NativeCodec}
    try:
        from dispatch.protocol.gt06 import Gt06Codec

        factories["gt06"] = Gt06Codec
    except ImportError:
        pass
    try:
        from dispatch.protocol.jt808 import Jt808Codec

        factories["jt808"] = Jt808Codec
    except ImportError:
        pass
    return factories


class DispatchApp:
    """One process: terminal listeners, gateway, live state, HTTP API."""

    def __init__(self, config: Config, reactor: Any, any_port: frozenset[str] = frozenset()):
        """``any_port`` names listeners to bind on an OS-chosen port (tests use it)."""
        self.config = config
        self.reactor = reactor
        self.any_port = any_port
        self.db = dbmod.Database(config.db, reactor, max_threads=config.db_threads)
        offline_after = config.heartbeat_interval * config.offline_after
        self.live = LiveState(offline_after)
        self.gateway = Gateway(
            reactor,
            self.db,
            self.live,
            heartbeat_interval=config.heartbeat_interval,
            sos_dedup=timedelta(hours=config.sos_dedup_hours),
            low_battery=config.low_battery,
        )
        self.live.on_offline.append(self._device_offline)
        self.flusher = LiveStateFlusher(reactor, self.db, self.live, config.flush_interval)
        self.api = Api(self.db, reactor, self.live)
        self.engine = EscalationEngine(
            reactor,
            self.db,
            self._channel(),
            callback_base=self._public_url(),
            relay_numbers={"relay_110": config.relay_110, "relay_120": config.relay_120},
        )
        self.gateway.incident_listeners.append(self._incident_opened)
        self.engine.alarms_pending = self.gateway.sos_committer.when_idle
        self.care = CareScheduler(
            reactor,
            self.db,
            self.gateway,
            self.engine.channel,
            self.engine,
            callback_base=self.engine.callback_base,
            config=CareConfig(
                offline_after_s=config.offline_incident_after,
                inactivity_days=config.inactivity_days,
            ),
        )
        self.gateway.care_listeners.append(self.care.terminal_answer)
        self.gateway.battery_listeners.append(self.care.battery_low)
        self.bus = QueueBus()
        self.engine.on_change.append(
            lambda incident_id, what: self.bus.publish(
                {"type": "incident", "id": incident_id, "what": what}
            )
        )
        self.ports: dict[str, int] = {}
        self._listening: list[Any] = []
        self._factories: list[TerminalStreamFactory] = []

    def _channel(self) -> Channel:
        if self.config.webhook_url:
            return WebhookChannel(
                self.reactor, self.config.webhook_url, self.config.webhook_secret.encode()
            )
        return LogChannel()

    def _public_url(self) -> str:
        if self.config.public_url:
            return self.config.public_url
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::") else self.config.host
        return f"http://{host}:{self.config.http_port}"

    def _incident_opened(self, record: Any, event: Any, _device: Any) -> None:
        what = "new" if record.created else "alarm_repeat"
        self.bus.publish(
            {
                "type": "incident",
                "id": record.incident_id,
                "what": what,
                "trigger": event.trigger.name.lower(),
            }
        )
        if record.created:
            self.engine.incident_opened(record.incident_id)

    def _device_offline(self, d: DeviceLive, reason: str) -> None:
        link = self.gateway.links.get(d.ident)
        log.info("device_offline", ident=d.ident, reason=reason)
        self.live.log_event(
            {
                "at": utc(self.reactor.seconds()),
                "kind": "offline",
                "device_ident": d.ident,
                "subscriber_id": None,
                "incident_id": None,
                "data": {"reason": reason},
            }
        )
        # A silent TCP link is probably half-open; a terminal that logged out closes its own.
        if link is not None and reason == "silent":
            link.close("silent")

    def _port(self, name: str) -> int | None:
        configured = getattr(self.config, f"{name}_port")
        if name in self.any_port:
            return 0
        return configured or None

    async def start(self) -> None:
        """Migrate the schema, restore live state, open every enabled listener."""
        await threads.deferToThread(dbmod.upgrade, self.config.db)
        self.db.start()
        for device_id, ident, last_seen in await self.db.read(device_repo.online_devices):
            seen = last_seen.timestamp() if last_seen else self.reactor.seconds()
            self.live.restore(device_id, ident, seen, self.reactor.seconds())
        host = self.config.host
        factories = codec_factories()
        for name in ("native", "gt06", "jt808"):
            port = self._port(name)
            if port is None or name not in factories:
                continue
            factory = TerminalStreamFactory(factories[name], self.gateway, self.reactor)
            self._factories.append(factory)
            self._listen(name, self.reactor.listenTCP(port, factory, interface=host))
        port = self._port("native")
        if port is not None:
            udp = NativeDatagramProtocol(self.gateway, self.reactor, self.config.udp_rate)
            self._listen(
                "native_udp",
                self.reactor.listenUDP(self.ports.get("native", port), udp, interface=host),
            )
        port = self._port("http")
        if port is not None:
            handlers = escalation_api.EscalationApi(
                self.engine, self.db, self.reactor, self.config.webhook_secret.encode()
            )
            handlers.care = self.care
            self.escalation_api = handlers
            root = build_site_root(
                self.api,
                (escalation_api.add_routes, handlers),
                (care_api.add_routes, care_api.CareApi(self.db, self.care)),
            )
            root.streams["/api/v1/incidents/stream"] = (
                lambda request: open_stream(request, self.bus, self.reactor),
                ALL,
            )
            site = server.Site(root)
            site.noisy = False
            self._listen("http", self.reactor.listenTCP(port, site, interface=host))
            if not self.config.public_url:
                self.engine.callback_base = self._public_url().rsplit(":", 1)[0] + (
                    f":{self.ports['http']}"
                )
                self.care.callback_base = self.engine.callback_base
        self.flusher.start()
        await self.engine.start()
        self.care.start()
        self.api.ready = True
        log.info("serving", db=self.config.db.split("@")[-1], ports=self.ports)

    def _listen(self, name: str, port: Any) -> None:
        self._listening.append(port)
        self.ports[name] = port.getHost().port

    async def stop(self) -> None:
        """Close listeners and terminal connections, flush live state, stop the pools."""
        self.api.ready = False
        for port in self._listening:
            await port.stopListening()
        self._listening.clear()
        for link in list(self.gateway.links.values()):
            link.close("shutdown")
        for factory in self._factories:
            factory.close_all("shutdown")
        self.care.stop()
        self.engine.stop()
        self.bus.close()
        await self.flusher.stop()
        self.db.stop()
