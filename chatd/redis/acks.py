"""
``--store-acks N``: a write is answered only once N replicas hold it
(``WAIT``), with group commit: one WAIT in flight per connection covers
every write sent before it.
"""

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatd.errors import StoreUnavailable


class StoreAcks:
    """The WAITs of one store connection (:class:`chatd.redis.client.RedisClient`)."""

    log = Logger()

    def __init__(self, send, timeout, acks, stats):
        self.send = send          # the client's send(args) -> Deferred of the reply
        self.timeout = timeout
        self.acks = acks          # replicas that must confirm a write
        self.stats = stats
        self._unconfirmed = []    # (call Deferred, caller's Deferred) since the last WAIT
        self._confirming = False  # a WAIT is in flight

    def confirmed(self, call):
        """The caller's Deferred of a write ``call``, released only once
        ``WAIT acks`` sent after it says enough replicas hold it.

        Every function is waited for, reads too: a read may return writes of
        other connections that no replica holds yet (the fetch step then
        makes a write of no change, so that the WAIT covers what it read).

        Group commit: one WAIT in flight per connection; every write sent
        while it is out waits for the next one, which is sent when it
        returns. A WAIT covers every write sent before it on the connection,
        and the replies come in order, so each caller is released in send
        order (one connection's order is kept)."""
        d = defer.Deferred()
        self._unconfirmed.append((call, d))
        if not self._confirming:
            self._send_wait()
        return d

    def _send_wait(self):
        group, self._unconfirmed = self._unconfirmed, []
        self._confirming = True
        # WAIT blocks the connection while it waits: at most half the deadline,
        # so that the calls behind it still make theirs
        wait_ms = max(1, int(self.timeout * 500))
        self.send((b"WAIT", self.acks, wait_ms)).addBoth(self._waited, group)

    def _waited(self, replicas, group):
        self._confirming = False
        if isinstance(replicas, Failure):
            why = "no answer to WAIT (%s)" % replicas.getErrorMessage()
        elif replicas < self.acks:
            why = "%d of %d replica(s) confirmed it" % (replicas, self.acks)
        else:
            why = None
        if why is not None:
            self.stats.unconfirmed += len(group)
            self.log.warn("--store-acks {n}: {why}; {count} write(s) answered "
                          "'unavailable'", n=self.acks, why=why, count=len(group))
        for call, d in group:
            call.addBoth(self._release, d, why)
        if self._unconfirmed:
            self._send_wait()

    @staticmethod
    def _release(result, d, why):
        if why is not None and not isinstance(result, Failure):
            d.errback(StoreUnavailable(
                "written, but %s in time: it may be lost on a failover (a retry "
                "with the same ref is answered from the first)" % why))
        else:
            d.callback(result)  # a Failure errbacks
