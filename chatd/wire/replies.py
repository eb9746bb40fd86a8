"""
A session's replies in packet order, and its packets in flight
(:class:`ReplyOrder`, a base class of :class:`chatd.wire.session.Session`).

Replies go out in the order of the packets they answer, whatever order the
store finishes in (contract 1.1, "one connection, one order"): a packet
whose answer takes a store call owes a slot (:meth:`ReplyOrder._owe`); a
reply that is ready while an earlier slot is still empty waits behind it.
"""

import collections

from twisted.internet import defer

#: packets of one connection awaiting their reply at which it stops being
#: read (so that one client cannot fill the store's queue), and resumes
MAX_INFLIGHT = 256
RESUME_INFLIGHT = 128


class ReplyOrder:
    """Uses of the session: ``send_lines``, ``_pauses`` and ``_resume``.

    Nothing is made for a connection with nothing in flight: the queue and
    the waiters are None until needed."""

    # its state (slots of the Session): _inflight (0 at first) packets whose
    # reply is not written yet; _replies deque([reply or None]) in packet
    # order, while any is owed; _idle [Deferreds waiting for _inflight == 0]
    __slots__ = ()

    def _owe(self):
        """A packet whose reply comes later: its slot, in packet order."""
        slot = [None]
        replies = self._replies
        if replies is None:
            replies = self._replies = collections.deque()
        replies.append(slot)
        self._inflight += 1
        return slot

    def _reply(self, data):
        """Send the reply to the packet just read: now, unless an earlier
        packet's reply is still to come."""
        if self._replies:
            self._replies.append([data])
        else:
            self.send_lines(data)

    def _fill(self, slot, data):
        """An awaited reply is ready: send it and every reply queued behind it,
        up to the next one still awaited."""
        slot[0] = data
        replies = self._replies
        while replies and replies[0][0] is not None:
            data = replies.popleft()[0]
            if data:  # b"": a packet with no reply (a read) kept its place
                self.send_lines(data)
        if not replies:
            self._replies = None

    def _done(self):
        self._inflight -= 1
        if self._inflight <= RESUME_INFLIGHT and "inflight" in self._pauses:
            self._resume("inflight")
        if not self._inflight:
            self._wake_idle()

    def when_idle(self):
        """Deferred that fires when every packet read so far has its reply."""
        if not self._inflight:
            return defer.succeed(None)
        d = defer.Deferred()
        if self._idle is None:
            self._idle = []
        self._idle.append(d)
        return d

    def _wake_idle(self):
        waiting, self._idle = self._idle, None
        for d in waiting or ():
            d.callback(None)
