"""Group commit for alarms: every SOS waiting is stored in one transaction.

An SOS is acknowledged only once it is committed, and a commit costs an fsync.
One SOS at a time, a burst of a thousand presses (a power cut, a test alarm)
queues a thousand fsyncs.  Here one transaction is in flight at a time; the
SOS frames that arrive while it commits go together in the next one, so a
lone press is not delayed and a burst costs a handful of commits.

A group is stored with :func:`dispatch.store.sos_batch.record_sos_batch`: a few bulk
statements for the whole group instead of the ORM's six statements per frame, so the
CPU a group costs under the GIL no longer grows by ~2 ms per SOS.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from dispatch.store.incidents import SosInput, SosRecord
from dispatch.store.sos_batch import record_sos_batch

MAX_BATCH = 500


def record_batch(session: Any, items: list[SosInput], window: timedelta) -> list[SosRecord]:
    """Store several SOS frames in one transaction (dedup sees earlier ones in the batch).

    The records are those ``record_sos`` would return for the frames one after another.
    """
    return record_sos_batch(session, items, window)


class SosCommitter:
    """Queue SOS frames and commit them in groups on the store's urgent pool."""

    def __init__(self, db: Any, dedup: timedelta, max_batch: int = MAX_BATCH) -> None:
        self.db = db
        self.dedup = dedup
        self.max_batch = max_batch
        self._pending: list[tuple[SosInput, defer.Deferred[SosRecord]]] = []
        self._busy = False
        self._idle_waiters: list[defer.Deferred[None]] = []
        self.batches = 0

    def when_idle(self) -> defer.Deferred[None] | None:
        """None if no SOS is waiting for the store, else a Deferred that fires when none is.

        Work that can wait a moment (planning escalations) asks first, so that during a
        burst the CPU goes to committing and acknowledging alarms.
        """
        if not self._busy and not self._pending:
            return None
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def submit(self, item: SosInput) -> defer.Deferred[SosRecord]:
        """Fires with the stored record once the transaction holding it has committed."""
        d: defer.Deferred[SosRecord] = defer.Deferred()
        self._pending.append((item, d))
        self._next()
        return d

    def _next(self) -> None:
        if self._busy or not self._pending:
            return
        batch = self._pending[: self.max_batch]
        self._pending = self._pending[self.max_batch :]
        self._busy = True
        self.batches += 1
        d = self.db.urgent(record_batch, [item for item, _ in batch], self.dedup)
        d.addCallbacks(self._stored, self._failed, callbackArgs=(batch,), errbackArgs=(batch,))
        d.addBoth(self._done)

    @staticmethod
    def _stored(records: list[SosRecord], batch: list) -> None:
        for (_, waiter), record in zip(batch, records, strict=True):
            waiter.callback(record)

    @staticmethod
    def _failed(failure: Failure, batch: list) -> None:
        # The whole transaction rolled back: nobody is acked, every terminal resends.
        for _, waiter in batch:
            waiter.errback(failure)

    def _done(self, _: Any) -> None:
        self._busy = False
        self._next()
        if not self._busy:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.called:  # a waiter that gave up was cancelled
                    waiter.callback(None)
