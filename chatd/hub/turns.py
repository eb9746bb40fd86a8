"""
Store work in turns (:class:`Turns`): at most ``limit`` calls of one kind in
flight on a node, the others waiting in arrival order. The hub has two:

``binds`` (``bind_turns``, 256): registers and reconnects. After a restart
every phone reconnects at once; started all together, tens of thousands of
binds (three store calls each) queued behind each other on the store
connection until the last ones passed the store deadline and were answered
``unavailable`` (issue 24: 19,617 of 20,000 in one storm), to come back and
queue again. In turns, a bind's calls are sent only when it is its turn, so
each is answered well within the deadline; the waiting ones cost a
connection each, nothing more, and are served first come first served
(``--auth-timeout`` is their limit).

``reads`` (``drain_reads``, 64): inbox reads. Each returns up to
``drain_batch`` messages (and at most half the output limit in bytes): so at
most that many batches are in memory at once however many drains start
together, and each drain takes its turn per batch: a device with 10,000
waiting reads one batch, pushes it and queues again behind the devices that
came meanwhile, so it never starves them (fair slices).
"""

import collections

from twisted.internet import defer


class Turns:
    """Calls in flight (at most ``limit``) and the ones waiting their turn."""

    def __init__(self, limit):
        self.limit = max(1, limit)
        self.busy = 0        # calls in flight
        self.peak = 0        # the most in flight at once (since start)
        self.peak_waiting = 0
        self._waiting = collections.deque()  # (Deferred, owner, call, args)

    @property
    def waiting(self):
        return len(self._waiting)

    def run(self, owner, call, *args):
        """Deferred of ``call(*args)`` once it is its turn; of None, without
        calling, if ``owner`` (a delivery or a connection) has closed
        meanwhile."""
        d = defer.Deferred()
        if self.busy < self.limit and not self._waiting:
            self._run(d, call, args)
        else:
            self._waiting.append((d, owner, call, args))
            if len(self._waiting) > self.peak_waiting:
                self.peak_waiting = len(self._waiting)
        return d

    def _run(self, d, call, args):
        self.busy += 1
        if self.busy > self.peak:
            self.peak = self.busy
        try:
            r = defer.maybeDeferred(call, *args)
        except Exception:
            r = defer.fail()
        r.addBoth(self._done, d)

    def _done(self, result, d):
        self.busy -= 1
        self._next()
        d.callback(result)  # a Failure errbacks

    def _next(self):
        while self._waiting and self.busy < self.limit:
            d, owner, call, args = self._waiting.popleft()
            if owner.closed:
                d.callback(None)
                continue
            self._run(d, call, args)
