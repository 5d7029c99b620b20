"""The bare-reactor ceiling: read native frames, answer each with a fixed ACK, nothing else.

    python -m benchmarks.baseline_server --port 7790 [--host 127.0.0.1] [--cpu 0]

It does exactly what any native server must do per frame and no more: find the
magic, read the length, slice the frame off the stream, write a pre-built ACK.
No CRC check, no decoding, no session, no metrics, no store, no logging.  The
ACK names the type of the frame it answers (so a fleet can see its login acked)
but always ref_seq 0.  It serves until SIGTERM/SIGINT and prints one JSON line
with its port on stdout once listening.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import resource
import sys
from typing import Any

from twisted.internet.protocol import Factory, Protocol

from dispatch.protocol import native_format as fmt
from dispatch.protocol.native_format import MsgType

MAGIC = fmt.MAGIC
HEADER = fmt.HEADER_SIZE
OVERHEAD = fmt.OVERHEAD

# One pre-built ACK per terminal frame type; anything else gets the heartbeat one.
ACKS: dict[int, bytes] = {
    int(t): fmt.build_frame(
        MsgType.ACK, "baseline", 0, {"ref_type": int(t), "ref_seq": 0, "server_time": 0}
    )
    for t in (MsgType.LOGIN, MsgType.HEARTBEAT, MsgType.SOS, MsgType.CARE_ANSWER, MsgType.ACK)
}
DEFAULT_ACK = ACKS[MsgType.HEARTBEAT]


class BaselineProtocol(Protocol):
    """Frame splitter with a canned reply."""

    def __init__(self) -> None:
        self.buf = b""

    def dataReceived(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        n = len(buf)
        i = 0
        out = []
        while n - i >= HEADER:
            if buf[i] != 0xD5 or buf[i + 1] != 0x7E:
                j = buf.find(MAGIC, i + 1)
                if j < 0:
                    i = n - 1 if buf[-1] == 0xD5 else n
                    break
                i = j
                continue
            total = OVERHEAD + ((buf[i + 3] << 8) | buf[i + 4])
            if n - i < total:
                break
            out.append(ACKS.get(buf[i + 5], DEFAULT_ACK))
            i += total
        self.buf = buf[i:] if i < n else b""
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))


class BaselineFactory(Factory):
    protocol = BaselineProtocol
    noisy = False


def raise_nofile() -> tuple[int, int]:
    """Raise the open-files soft limit to the hard limit; returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.baseline_server", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: an OS-chosen port (printed)")
    p.add_argument("--backlog", type=int, default=50, help="as dispatch (Twisted default)")
    p.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    args = p.parse_args(argv)
    if not ipaddress.ip_address(args.host).is_loopback:
        p.error("--host must be a loopback address (127.0.0.0/8)")
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    nofile = raise_nofile()
    from twisted.internet import reactor

    port: Any = reactor.listenTCP(
        args.port, BaselineFactory(), backlog=args.backlog, interface=args.host
    )
    print(
        json.dumps({"event": "listening", "port": port.getHost().port, "nofile": list(nofile)}),
        flush=True,
    )
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
