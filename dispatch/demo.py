"""`dispatch demo`: seed demo subscribers and drive them with simulated terminals."""

from __future__ import annotations

import argparse
import io
import random
import sys
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from dispatch import logs
from dispatch.store import subscribers, tokens
from dispatch.store.models import Device

log = logs.get(__name__)

PEOPLE = [
    ("王奶奶", "鹿城区", "五马街道解放街12号", "alone", "chronic", None),
    ("陈爷爷", "瓯海区", "娄桥街道古岸头村3号", "spouse", "healthy", None),
    ("林阿婆", "龙湾区", "永中街道永宁西路88号", "alone", "disabled", "limb"),
    ("周老伯", "瑞安市", "安阳街道万松路5号", "children", "chronic", None),
    ("黄奶奶", "乐清市", "城东街道宁康西路20号", "alone", "disabled", "vision"),
    ("郑爷爷", "苍南县", "灵溪镇人民大道101号", "relatives", "chronic", None),
]


# Family members answer slowly or not at all, community workers go, 120 accepts relays.
RESPONDER_SCRIPT = {
    "13900000000": {"answer": "never"},
    "13900000001": {"answer": "accept", "after": 20},
    "13900000002": {"answer": "decline", "after": 5},
    "120": {"answer": "accept", "after": 10},
    "*": {"answer": "accept", "after": 30},
}
DEMO_SECRET = "demo-secret"


def _start_responders(app: Any) -> None:
    """Simulated family, community and 120 desk, so escalations visibly move."""
    from twisted.web.client import Agent

    from dispatch.routing.channels import WebhookChannel
    from simulators.responders import ResponderSite, validate_script

    reactor = app.reactor
    site = ResponderSite(
        validate_script(RESPONDER_SCRIPT), DEMO_SECRET, reactor, Agent(reactor), _Discard()
    )
    listening = reactor.listenTCP(0, site, interface="127.0.0.1")
    url = f"http://127.0.0.1:{listening.getHost().port}/"
    channel = WebhookChannel(reactor, url, DEMO_SECRET.encode())
    app.engine.channel = app.care.channel = channel
    app.escalation_api.secret = DEMO_SECRET.encode()
    log.info("demo_responders", url=url)


class _Discard(io.TextIOBase):
    def write(self, s: str) -> int:
        return len(s)


def _seed(session: Any, now: datetime) -> list[str]:
    idents = []
    for n, (name, district, address, living, health, disability) in enumerate(PEOPLE):
        ident = f"8600000000{n + 1:05d}"
        idents.append(ident)
        if session.scalar(select(Device.id).where(Device.ident == ident)) is not None:
            continue
        subscribers.create_subscriber(
            session,
            {
                "name": name,
                "district": district,
                "address": address,
                "living_situation": living,
                "health": health,
                "disability_type": disability,
                "contacts": [
                    {"name": f"{name[0]}家属", "phone": f"1390000{n:04d}", "relation": "child"},
                    {
                        "name": "社区网格员",
                        "phone": f"1380000{n:04d}",
                        "relation": "worker",
                        "tier": "community",
                    },
                ],
                "device": {"protocol": "native", "ident": ident},
            },
            now,
        )
    return idents


async def run_demo(app: Any) -> None:
    """Seed, print an operator token, start terminals; some press SOS as time goes by."""
    from simulators.terminal import SimTerminal, TcpDriver, make_codec

    reactor = app.reactor
    now = datetime.now(UTC)
    idents = await app.db.write(_seed, now)
    token = await app.db.write(tokens.create_token, "operator", "demo-operator", None, now)
    port, http = app.ports.get("native"), app.ports.get("http")
    print(f"demo: operator token {token}", file=sys.stderr)
    print(
        f"demo: curl -H 'Authorization: Bearer {token}' "
        f"'http://127.0.0.1:{http}/api/v1/incidents?status=open'",
        file=sys.stderr,
    )
    if port is None:
        log.error("demo_needs_native_port")
        return
    _start_responders(app)
    for n, ident in enumerate(idents):
        opts = argparse.Namespace(
            battery=random.randint(40, 100),
            heartbeat=10.0,
            signal=random.randint(40, 90),
            sos_trigger="fall" if n == 2 else "button",
            sos_retry=5.0,
            lat=27.99 + n / 100,
            lon=120.69 + n / 100,
            care_answer="ok",
            duration=0,
        )
        term = SimTerminal(make_codec("native", ident), reactor, opts, _Discard())
        TcpDriver(reactor, "127.0.0.1", port, term).start()
        if n in (0, 2):
            reactor.callLater(5 + 15 * n, term.press_sos)
    log.info("demo_running", terminals=len(idents))
