"""GT06 and JT/T 808 terminals on their own ports, driven by the simulators over loopback."""

from __future__ import annotations

import pytest
import pytest_twisted

from dispatch.protocol import gt06
from tests.integration.harness import RawClient, run_terminal, sleep, start_server, stop_server

IMEI = "359710045120345"
PHONE = "13800138000"


def _summary(lines: list[dict]) -> dict:
    [summary] = [line for line in lines if line["dir"] == "summary"]
    return summary


def _rx(lines: list[dict]) -> list[dict]:
    return [line for line in lines if line["dir"] == "rx"]


@pytest_twisted.ensureDeferred
async def test_gt06_login_heartbeat_sos(db_url):
    """GT06: login → online with battery and signal; SOS alarm → incident with location → ack."""
    server = await start_server(db_url, flush_interval=0.2)
    try:
        sub_id = await server.subscriber(IMEI, protocol="gt06")
        code, lines = await run_terminal(
            "--protocol",
            "gt06",
            "--server",
            f"127.0.0.1:{server.ports['gt06']}",
            "--ident",
            IMEI,
            "--sos-after",
            "0.5",
            "--lat",
            "27.9938",
            "--lon",
            "120.6994",
            "--battery",
            "60",
        )
        assert code == 0, lines
        rx = _rx(lines)
        assert rx[0]["type"] == "login_ack"
        sos_key = next(line["key"] for line in lines if line["type"] == "sos")
        assert sos_key[0] == 0x26  # alarm packet, acked with the same protocol and serial
        assert _summary(lines)["sos_acked"] is True
        await sleep(0.4)
        code, device = await server.get(f"/api/v1/devices/{IMEI}")
        assert device["online"] is True and device["protocol"] == "gt06"
        # 59 % is voltage level 4 (reported back as 50 %); 70 % signal is 2 bars (50 %).
        assert device["battery"] == 50 and device["signal"] == 50
        code, queue = await server.get("/api/v1/incidents?status=open")
        [item] = queue["items"]
        assert item["subscriber_id"] == sub_id and item["kind"] == "sos"
        assert item["location"]["lat"] == pytest.approx(27.9938, abs=1e-5)
        assert item["location"]["lon"] == pytest.approx(120.6994, abs=1e-5)
    finally:
        await stop_server(server)


@pytest.mark.parametrize("edition", ["2013", "2019"])
@pytest_twisted.ensureDeferred
async def test_jt808_register_authenticate_heartbeat_sos(db_url, edition):
    """JT/T 808: registration → auth code → authentication → heartbeat → emergency 0x0200."""
    server = await start_server(db_url, flush_interval=0.2)
    try:
        sub_id = await server.subscriber(PHONE, protocol="jt808")
        code, lines = await run_terminal(
            "--protocol",
            "jt808",
            "--jt808-edition",
            edition,
            "--server",
            f"127.0.0.1:{server.ports['jt808']}",
            "--ident",
            PHONE,
            "--sos-after",
            "0.5",
            "--lat",
            "27.9938",
            "--lon",
            "-120.6994",
        )
        assert code == 0, lines
        rx = _rx(lines)
        assert rx[0]["type"] == "register_ack" and rx[0]["result"] == 0 and rx[0]["auth_code"]
        assert rx[1]["type"] == "ack" and rx[1]["reply_id"] == 0x0102 and rx[1]["result"] == 0
        sos_ack = [r for r in rx if r["type"] == "ack" and r.get("key") is not None][-1]
        assert sos_ack["reply_id"] == 0x0200 and sos_ack["result"] == 4  # alarm confirmed
        await sleep(0.4)
        code, device = await server.get(f"/api/v1/devices/{PHONE}")
        assert device["online"] is True and device["battery"] is not None
        code, queue = await server.get("/api/v1/incidents?status=open")
        [item] = queue["items"]
        assert item["subscriber_id"] == sub_id
        assert item["location"]["lon"] == pytest.approx(-120.6994, abs=1e-6)
    finally:
        await stop_server(server)


@pytest_twisted.ensureDeferred
async def test_jt808_wrong_auth_code_refused(db_url):
    """After registration, authenticating with a wrong code is refused and creates nothing."""
    from simulators.jt808_codec import Jt808TerminalCodec

    server = await start_server(db_url)
    try:
        await server.subscriber(PHONE, protocol="jt808")
        term = Jt808TerminalCodec(PHONE)
        client = RawClient(server.ports["jt808"])
        client.send(term.register())
        [reg] = term.feed(await client.recv(0.5))
        assert reg["result"] == 0
        client.send(term.authenticate("not-the-code"))
        replies = term.feed(await client.recv(0.5))
        assert replies[0]["reply_id"] == 0x0102 and replies[0]["result"] != 0
        client.close()
    finally:
        await stop_server(server)


@pytest_twisted.ensureDeferred
async def test_gt06_unknown_imei_and_garbage_do_not_disturb_others(db_url):
    """An unknown IMEI is closed and counted; noise is counted; an enrolled GT06 still works."""
    server = await start_server(db_url)
    try:
        await server.subscriber(IMEI, protocol="gt06")
        stranger = RawClient(server.ports["gt06"])
        login = gt06.build_frame(0x01, bytes.fromhex("0123456789012345"), 1)
        stranger.send(login)
        assert await stranger.is_closed()
        noisy = RawClient(server.ports["gt06"])
        noisy.send(b"\x00\xff" * 3000)
        code, lines = await run_terminal(
            "--protocol",
            "gt06",
            "--server",
            f"127.0.0.1:{server.ports['gt06']}",
            "--ident",
            IMEI,
            "--sos-after",
            "0.3",
        )
        assert code == 0
        assert await noisy.is_closed()
        assert (
            await server.metric(
                "dispatch_frames_rejected_total", protocol="gt06", reason="unknown_device"
            )
            >= 1
        )
        assert (
            await server.metric("dispatch_decode_errors_total", protocol="gt06", reason="noise")
            >= 1
        )
    finally:
        await stop_server(server)
