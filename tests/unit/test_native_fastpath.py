"""The hand-packed ACK equals the construct-declared one, byte for byte."""

from __future__ import annotations

import pytest

from dispatch.protocol import native_format as fmt
from dispatch.protocol.native import FrameRef, ack
from dispatch.protocol.native_format import MsgType


@pytest.mark.parametrize(
    ("ident", "msg_type", "seq", "server_time", "out_seq"),
    [
        ("860000000000001", MsgType.HEARTBEAT, 1, 1_800_000_000, 0),
        ("A", MsgType.SOS, 0xFFFFFFFF, 0, 7),
        ("0123456789ABCDEF", MsgType.LOGIN, 65_536, 1_700_000_123.9, 0xFFFFFFFF),
        ("term-01", MsgType.CARE_ANSWER, 42, 4_294_967_295, 1),
    ],
)
def test_fast_ack_matches_declared_format(ident, msg_type, seq, server_time, out_seq) -> None:
    """ack() builds exactly what build_frame() builds from the construct declaration."""
    declared = fmt.build_frame(
        MsgType.ACK,
        ident,
        out_seq,
        {"ref_type": msg_type, "ref_seq": seq, "server_time": int(server_time)},
    )
    assert ack(FrameRef(msg_type, seq, ident), server_time, out_seq) == declared
