"""
What the terminal client has to send: the messages typed and not answered
yet, in the order typed, each with the ``ref`` that makes a resend harmless
(the server never stores it twice), at most :data:`SEND_WINDOW` of them
written and unanswered at a time.
"""

import secrets
from collections import OrderedDict
from dataclasses import dataclass

from twisted.internet import defer

#: sends written but not answered yet, at most; the rest wait their turn (a
#: pasted file must not run into the server's rate limit all at once)
SEND_WINDOW = 32
#: how long to wait before resending a message the server refused as rate_limited
RATE_RETRY = 1.0


@dataclass
class Outgoing:
    """One message typed and not answered yet. ``sent``: written on the
    current connection (a new connection sends it again, same ``ref``)."""

    ref: str
    receiver: str
    text: str
    sent: bool = False


class Outbox:
    """The unanswered messages of one session, by ``ref``, oldest first.

    It decides what is written and when (:meth:`pump`, a pause after
    rate_limited); the session says where it is written and when it may be
    (bound, connected). ``clock`` schedules the pause.
    """

    def __init__(self, clock):
        self.clock = clock
        self.entries = OrderedDict()  # ref -> Outgoing, in the order typed
        self._run = secrets.token_hex(4)  # refs must not repeat across runs
        self._sends = 0
        self._paused = None  # the call that ends a pause after rate_limited
        self._idle = []

    def __len__(self):
        return len(self.entries)

    def add(self, receiver, text):
        """Queue a message with a new ref: an :class:`Outgoing`."""
        self._sends += 1
        entry = Outgoing("c-%s-%d" % (self._run, self._sends), receiver, text)
        self.entries[entry.ref] = entry
        return entry

    def get(self, ref):
        """The entry of a reply's ref (anything, as the server sent it), or None."""
        return self.entries.get(ref) if isinstance(ref, str) else None

    def pop(self, ref):
        """Take the entry of a reply's ref out (it is answered), or None."""
        return self.entries.pop(ref, None) if isinstance(ref, str) else None

    def when_idle(self):
        """Deferred that fires once every queued message is answered."""
        if not self.entries:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle.append(d)
        return d

    def fire_if_idle(self):
        if not self.entries:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def pump(self, write):
        """Write queued messages with ``write(entry)``, oldest first, keeping
        SEND_WINDOW in flight; nothing while paused."""
        if self._paused is not None:
            return
        in_flight = sum(1 for e in self.entries.values() if e.sent)
        for entry in self.entries.values():
            if in_flight >= SEND_WINDOW:
                break
            if entry.sent:
                continue
            write(entry)
            entry.sent = True
            in_flight += 1

    def unsend_from(self, entry):
        """This entry and every one written after it go again."""
        later = False
        for other in self.entries.values():
            later = later or other is entry
            if later:
                other.sent = False

    def pause(self, resume):
        """The server dropped a send as rate_limited: nothing was done with it,
        so it is sent again (same ref) a little later: ``resume()`` is called
        after RATE_RETRY, and nothing is written until then."""
        if self._paused is None:
            def done():
                self._paused = None
                resume()
            self._paused = self.clock.callLater(RATE_RETRY, done)

    def cancel_pause(self):
        if self._paused is not None and self._paused.active():
            self._paused.cancel()
        self._paused = None

    def connection_lost(self):
        """Nothing is in flight any more: all of it goes again on the next
        connection, without waiting for a pause of the old one."""
        for entry in self.entries.values():
            entry.sent = False
        self.cancel_pause()
