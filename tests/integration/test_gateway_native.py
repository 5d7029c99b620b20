"""The real server on loopback, driven by the terminal simulator, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest_twisted

from dispatch import events as ev
from simulators.native_codec import NativeTerminalCodec
from tests.integration.harness import (
    RawClient,
    run_terminal,
    sleep,
    start_server,
    stop_server,
)

IDENT = "860000000000001"


def _summary(lines: list[dict]) -> dict:
    [summary] = [line for line in lines if line["dir"] == "summary"]
    return summary


def _types(lines: list[dict], direction: str) -> list[str]:
    return [line["type"] for line in lines if line["dir"] == direction]


@pytest_twisted.ensureDeferred
async def test_login_makes_device_online_with_battery(db_url):
    """A simulated terminal logs in and heartbeats; the API shows it online with its battery."""
    server = await start_server(db_url, flush_interval=0.2)
    try:
        await server.subscriber(IDENT)
        code, lines = await run_terminal(
            "--server",
            f"127.0.0.1:{server.ports['native']}",
            "--ident",
            IDENT,
            "--duration",
            "1.5",
            "--battery",
            "77",
        )
        assert code == 0
        assert "login_ack" in _types(lines, "rx")
        assert "settings" in _types(lines, "rx")
        await sleep(0.5)  # one flush interval
        code, device = await server.get(f"/api/v1/devices/{IDENT}")
        assert code == 200
        assert device["online"] is True
        assert device["battery"] == 76  # the simulator drains 1% per heartbeat
        assert device["signal"] == 70
        assert device["firmware"] == "sim-1.0"
        assert device["last_seen"] is not None
    finally:
        await stop_server(server)


@pytest_twisted.ensureDeferred
async def test_sos_creates_incident_before_ack(db_url):
    """SOS → the simulator gets its ack, and the incident is in the live queue with location."""
    server = await start_server(db_url)
    try:
        sub_id = await server.subscriber(IDENT)
        code, lines = await run_terminal(
            "--server",
            f"127.0.0.1:{server.ports['native']}",
            "--ident",
            IDENT,
            "--sos-after",
            "0.5",
            "--lat",
            "27.994",
            "--lon",
            "120.699",
        )
        assert code == 0, lines
        assert _summary(lines)["sos_acked"] is True
        code, queue = await server.get("/api/v1/incidents?status=open")
        assert code == 200
        [item] = queue["items"]
        assert item["kind"] == "sos" and item["subscriber_id"] == sub_id
        code, incident = await server.get(f"/api/v1/incidents/{item['id']}")
        assert incident["device_ident"] == IDENT
        assert incident["location"]["lat"] == 27.994
        assert [t["action"] for t in incident["timeline"] if t["action"].startswith("alarm")] == [
            "alarm"
        ]
        assert await server.metric("dispatch_sos_ack_latency_seconds_count") >= 1
    finally:
        await stop_server(server)


@pytest_twisted.ensureDeferred
async def test_resent_sos_creates_one_incident(db_url):
    """The same SOS frame sent three times, across a reconnect, is acked each time, stored once."""
    server = await start_server(db_url)
    try:
        await server.subscriber(IDENT)
        codec = NativeTerminalCodec(IDENT)
        sos, key = codec.sos(ev.SosTrigger.BUTTON, None, 1_700_000_000, 50)
        acks = []
        for _ in range(2):
            client = RawClient(server.ports["native"])
            client.send(codec.login())
            client.send(sos)
            client.send(sos)
            replies = codec.feed(await client.recv(1.0))
            acks += [r for r in replies if r["type"] == "ack" and r["key"] == key]
            client.close()
        assert len(acks) == 4
        code, queue = await server.get("/api/v1/incidents")
        assert len(queue["items"]) == 1
        code, incident = await server.get(f"/api/v1/incidents/{queue['items'][0]['id']}")
        assert [t["action"] for t in incident["timeline"] if t["action"].startswith("alarm")] == [
            "alarm"
        ]
    finally:
        await stop_server(server)


@pytest_twisted.ensureDeferred
async def test_new_press_joins_open_incident(db_url):
    """A second press (new seq) while the first incident is open is added to its timeline."""
    server = await start_server(db_url)
    try:
        await server.subscriber(IDENT)
        codec = NativeTerminalCodec(IDENT)
        client = RawClient(server.ports["native"])
        client.send(codec.login())
        client.send(codec.sos(ev.SosTrigger.BUTTON, None, 1_700_000_000, 50)[0])
        await client.recv(0.5)
        client.send(codec.sos(ev.SosTrigger.FALL, None, 1_700_000_060, 49)[0])
        await client.recv(0.5)
        client.close()
        code, queue = await server.get("/api/v1/incidents")
        assert len(queue["items"]) == 1
        code, incident = await server.get(f"/api/v1/incidents/{queue['items'][0]['id']}")
        assert [t["action"] for t in incident["timeline"] if t["action"].startswith("alarm")] == [
            "alarm",
            "alarm_repeat",
        ]
        assert [t for t in incident["timeline"] if t["action"] == "alarm_repeat"][0]["detail"][
            "trigger"
        ] == "fall"
    finally:
        await stop_server(server)


@pytest_twisted.ensureDeferred
async def test_udp_sos(db_url):
    """Over UDP the terminal logs in, presses SOS, gets the ack, and the incident exists."""
    server = await start_server(db_url)
    try:
        await server.subscriber(IDENT)
        code, lines = await run_terminal(
            "--server",
            f"127.0.0.1:{server.ports['native']}",
            "--ident",
            IDENT,
            "--udp",
            "--sos-after",
            "0.5",
        )
        assert code == 0, lines
        assert "login_ack" in _types(lines, "rx")
        code, queue = await server.get("/api/v1/incidents?status=open")
        assert [i["kind"] for i in queue["items"]] == ["sos"]
    finally:
        await stop_server(server)


@pytest_twisted.ensureDeferred
async def test_garbage_dropped_while_other_terminal_works(db_url):
    """Garbage on connect is counted and dropped; another terminal's SOS still goes through."""
    server = await start_server(db_url)
    try:
        await server.subscriber(IDENT)
        before = await server.metric(
            "dispatch_decode_errors_total", protocol="native", reason="noise"
        )
        junk = RawClient(server.ports["native"])
        junk.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 20)
        assert await junk.is_closed()
        code, lines = await run_terminal(
            "--server",
            f"127.0.0.1:{server.ports['native']}",
            "--ident",
            IDENT,
            "--sos-after",
            "0.3",
        )
        assert code == 0
        after = await server.metric(
            "dispatch_decode_errors_total", protocol="native", reason="noise"
        )
        assert after > before
    finally:
        await stop_server(server)


@pytest_twisted.ensureDeferred
async def test_unknown_device_refused(db_url):
    """An ident nobody enrolled gets a NACK, is counted, and creates nothing."""
    server = await start_server(db_url)
    try:
        code, lines = await run_terminal(
            "--server",
            f"127.0.0.1:{server.ports['native']}",
            "--ident",
            "999999999999999",
            "--sos-after",
            "0.3",
            "--timeout",
            "2",
        )
        assert code == 1
        assert "login_nack" in _types(lines, "rx")
        code, _ = await server.get("/api/v1/devices/999999999999999")
        assert code == 404
        assert (
            await server.metric(
                "dispatch_frames_rejected_total", protocol="native", reason="unknown_device"
            )
            >= 1
        )
    finally:
        await stop_server(server)


@pytest_twisted.ensureDeferred
async def test_restart_terminal_reconnects(db_url):
    """The server restarts on the same port; the terminal reconnects, and its SOS is stored."""
    server = await start_server(db_url, flush_interval=0.2)
    port = server.ports["native"]
    await server.subscriber(IDENT)
    from twisted.internet import defer

    proc = defer.ensureDeferred(
        run_terminal(
            "--server",
            f"127.0.0.1:{port}",
            "--ident",
            IDENT,
            "--sos-after",
            "3",
            "--duration",
            "7",
            "--heartbeat",
            "1",
        )
    )
    await sleep(1.0)
    await stop_server(server)
    await sleep(0.5)
    server = await start_server(db_url, ports={"native": port}, flush_interval=0.2)
    try:
        code, lines = await proc
        assert code == 0, lines
        events = [line["type"] for line in lines if line["dir"] == "event"]
        assert events.count("connected") >= 2
        assert _summary(lines)["sos_acked"] is True
        code, queue = await server.get("/api/v1/incidents")
        assert len(queue["items"]) == 1
        code, device = await server.get(f"/api/v1/devices/{IDENT}")
        assert device["online"] is True and device["battery"] is not None
    finally:
        await stop_server(server)
