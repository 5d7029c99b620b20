"""In-process publish/subscribe for live-queue changes (feeds the console stream)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dispatch import logs

log = logs.get(__name__)

Listener = Callable[[dict[str, Any]], None]


class QueueBus:
    """Fan out queue-change events to whoever listens (SSE clients)."""

    def __init__(self) -> None:
        self._listeners: set[Listener] = set()
        self._closers: dict[Listener, Callable[[], None]] = {}

    def subscribe(
        self, listener: Listener, on_close: Callable[[], None] | None = None
    ) -> Callable[[], None]:
        """Add a listener (``on_close`` runs at shutdown); returns a function removing it."""
        self._listeners.add(listener)
        if on_close is not None:
            self._closers[listener] = on_close

        def remove() -> None:
            self._listeners.discard(listener)
            self._closers.pop(listener, None)

        return remove

    def close(self) -> None:
        """Shutdown: tell every listener it is over."""
        for listener, closer in list(self._closers.items()):
            self._closers.pop(listener, None)
            self._listeners.discard(listener)
            try:
                closer()
            except Exception:
                log.exception("bus_close_failed")

    def publish(self, event: dict[str, Any]) -> None:
        """Deliver ``event`` to every listener; one failing listener does not stop others."""
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("bus_listener_failed")
                self._listeners.discard(listener)

    def __len__(self) -> int:
        return len(self._listeners)
