"""
The sweepers: bounded passes over the store, run by every node in the
background.

The outbox sweeper (Redis Cluster, receipts on): the backstop that moves a
receipt left in a receiver's outbox when the node that wrote it died (or its
store call failed) between the ack's step and the move into the sender's
inbox, even if that receiver never acks nor binds again (see
:mod:`chatd.store.receipts`). Only entries older than ``interval`` are
moved: a younger one is being moved by the node that wrote it. Nodes
sweeping the same outbox at once are harmless: the move is idempotent
(``receipt.lua``), so a receipt is made once.

The inbox sweeper (every store): gives an inbox left without a TTL (made by
one message that was never acked) the TTL it would have had (see
:mod:`chatd.store.inboxes`). Idempotent too: an inbox that has a TTL is left
as it is.

Who sweeps: every node, every primary. A pass runs every ``interval``
seconds, jittered (0.5x to 1.5x, so that the nodes do not sweep in step),
and is bounded: one SCAN step of about ``count`` keys per primary, its
cursor kept for the next pass, so a pass costs the same whatever the size of
the store; a whole keyspace takes (keys per primary / ``count``) passes.
"""

import random

from twisted.internet import defer
from twisted.logger import Logger

#: seconds between passes (mean), and keys a SCAN step looks at per primary
INTERVAL = 5.0
COUNT = 1000


class _Sweeper:
    """A pass (:meth:`_step`, a Deferred) every ``interval`` (jittered),
    never two at once, until :meth:`stop`."""

    log = Logger()
    what = "a sweeper"

    def __init__(self, store, reactor, interval=INTERVAL, count=COUNT, rng=None):
        self.store = store
        self.reactor = reactor
        self.interval = interval
        self.count = count
        self.rng = rng or random.Random()
        self.cursors = {}      # a primary -> its SCAN cursor
        self.passes = 0
        self._call = None
        self._running = None   # the pass in flight
        self._stopped = False

    def start(self):
        self._schedule()

    def _schedule(self):
        self._call = self.reactor.callLater(self.interval * self.rng.uniform(0.5, 1.5),
                                            self._pass)

    def _pass(self):
        self._call = None
        d = self._running = self._step()

        def done(result):
            self.passes += 1
            self._done(result)

        def over(_):
            self._running = None
            if self._call is None and not self._stopped:
                self._schedule()

        d.addCallback(done)
        d.addErrback(lambda f: self.log.failure(self.what, f))
        d.addBoth(over)

    def stop(self):
        """Stop; Deferred fired once a pass in flight is over."""
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._running is None:
            return defer.succeed(None)
        waiting = defer.Deferred()
        self._running.addBoth(lambda r: waiting.callback(None) or r)
        return waiting


class OutboxSweeper(_Sweeper):
    what = "the outbox sweeper"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.moved = 0         # entries moved since the start

    def _step(self):
        return self.store.sweep_pass(self.cursors, self.count, int(self.interval * 1000))

    def _done(self, result):
        self.moved += result[1]
        if result[1]:
            self.log.info("outbox sweeper: {n} receipt(s) left behind moved", n=result[1])


class InboxSweeper(_Sweeper):
    what = "the inbox sweeper"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.given = 0         # inboxes given their TTL since the start

    def _step(self):
        return self.store.inbox_ttl_pass(self.cursors, self.count)

    def _done(self, result):
        self.given += result[1]
