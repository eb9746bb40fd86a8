"""
Inbox reads in turn (:class:`InboxReads`, the hub's ``reads``): at most
``drain_reads`` (a setting, 64) inbox reads of one node in flight at once,
the others waiting in arrival order.

After a restart every phone comes back at once, each with messages waiting:
thousands of drains start together. Each read returns up to ``drain_batch``
messages (and at most half the output limit in bytes), so without a bound
the replies in flight alone could be thousands of batches at once. Here they
are at most ``limit`` batches, and each drain takes its turn per batch: a
device with 10,000 waiting reads one batch, pushes it and queues again
behind the devices that came meanwhile, so it never starves them (fair
slices, first come first served).
"""

import collections

from twisted.internet import defer


class InboxReads:
    """The node's inbox reads in flight, and the ones waiting their turn."""

    def __init__(self, limit):
        self.limit = max(1, limit)
        self.busy = 0        # reads in flight
        self.peak = 0        # the most in flight at once (since start)
        self.peak_waiting = 0
        self._waiting = collections.deque()  # (Deferred, delivery, call, args)

    @property
    def waiting(self):
        return len(self._waiting)

    def read(self, delivery, call, *args):
        """Deferred of ``call(*args)`` (a store read) once it is this
        delivery's turn; of None, without reading, if the delivery has
        closed meanwhile."""
        d = defer.Deferred()
        if self.busy < self.limit and not self._waiting:
            self._run(d, call, args)
        else:
            self._waiting.append((d, delivery, call, args))
            if len(self._waiting) > self.peak_waiting:
                self.peak_waiting = len(self._waiting)
        return d

    def _run(self, d, call, args):
        self.busy += 1
        if self.busy > self.peak:
            self.peak = self.busy
        try:
            r = call(*args)
        except Exception:
            r = defer.fail()
        r.addBoth(self._done, d)

    def _done(self, result, d):
        self.busy -= 1
        self._next()
        d.callback(result)  # a Failure errbacks

    def _next(self):
        while self._waiting and self.busy < self.limit:
            d, delivery, call, args = self._waiting.popleft()
            if delivery.closed:
                d.callback(None)
                continue
            self._run(d, call, args)
