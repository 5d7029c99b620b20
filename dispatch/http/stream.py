"""Server-Sent Events: the live queue's changes, pushed to the operator console.

``GET /api/v1/incidents/stream`` keeps the response open and writes one event per
change::

    event: incident
    data: {"id": 12, "what": "new", "kind": "sos"}

A comment line every 15 s keeps proxies from closing an idle stream. Clients
reload ``GET /api/v1/incidents/{id}`` (or the queue) when an event arrives.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import task
from twisted.web import server

from dispatch.bus import QueueBus

KEEPALIVE_S = 15.0


def open_stream(request: server.Request, bus: QueueBus, clock: Any) -> None:
    """Turn ``request`` into an event stream until the client goes away."""
    request.setResponseCode(200)
    request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-accel-buffering", b"no")
    request.write(b": dispatch live queue\n\n")

    def send(event: dict[str, Any]) -> None:
        data = json.dumps(event, ensure_ascii=False)
        request.write(f"event: {event.get('type', 'incident')}\ndata: {data}\n\n".encode())

    unsubscribe = bus.subscribe(send, on_close=request.finish)
    keepalive = task.LoopingCall(lambda: request.write(b": keepalive\n\n"))
    keepalive.clock = clock
    keepalive.start(KEEPALIVE_S, now=False)

    def closed(_: Any) -> None:
        unsubscribe()
        if keepalive.running:
            keepalive.stop()

    request.notifyFinish().addBoth(closed)
