"""
A session's output and flow control (:class:`Output`), and one write per
connection per turn of the reactor, straight to the socket.

Every reply and push of a turn is gathered per connection (``_out``) and
written once, at the start of the next turn (before the reactor polls
again). Twisted's ``transport.write`` would have gathered them too, but it
writes only after a poll: it asks epoll for the socket's writability
(``epoll_ctl``), is woken for it, writes, and takes the socket off epoll
again (``epoll_ctl``): two system calls and a dispatch of the reactor per
connection per turn, a sixth of chatd's time under load with many
connections. :func:`write_now` instead sends at once when nothing is queued
in the transport (the usual case: the client reads), and leaves only what
the kernel did not take to ``transport.write``, whose buffering, flow
control (``pauseProducing``) and error handling stay as they are.
"""

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer



class Outbox:
    """The connections with output waiting for the end of this turn."""

    def __init__(self, clock):
        self.clock = clock
        self._dirty = []
        self._call = None

    def add(self, conn):
        """conn has output in ``conn._out``: flush it at the next turn."""
        self._dirty.append(conn)
        if self._call is None:
            self._call = self.clock.callLater(0, self.flush)

    def flush(self):
        self._call = None
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn._flush_out()


@implementer(IPushProducer)
class Output:
    """The output half of a :class:`chatd.wire.session.Session` (a base
    class of it): server lines gathered per turn and written through the
    framing, the client that stops reading (the session is the producer
    registered with the stream, which tells it so), and the reasons reading
    is stopped (``_pauses``).

    Uses of the session: ``framing``, ``factory.outbox``, ``settings``,
    ``feed``, ``close``, ``_closing`` and ``log``."""

    # its state (slots of the Session): paused (False at first) reading
    # stopped (see _pause); _pauses (frozenset()) why reading is stopped (a
    # new set on each change); _unsent bytes written since the client stopped
    # reading; _writable [Deferreds waiting for the client to read again];
    # _out [bytes] to write at the end of this reactor turn
    __slots__ = ()

    def send_lines(self, item):
        """Write at the end of this reactor turn, together with every other
        line for this client: a server line (bytes ending in ``\\n``), or a
        batch of push lines (a sequence of bytes without their newline)."""
        if self._closing:
            return
        out = self._out
        if out is None:
            self._out = [item]
            self.factory.outbox.add(self)
        else:
            out.append(item)

    def _flush_out(self):
        """Write what this turn gathered; cut a client that has stopped
        reading and let too much pile up (its messages stay stored)."""
        out, self._out = self._out, None
        if not out or self._closing:
            return
        # what is written while the client does not read counts, the write
        # that fills its buffer included (a drain batch is at most half the
        # limit: hub.Delivery); only that write may be over the limit by
        # itself (one big pong does not cut a client that reads)
        counting = self._unsent is not None
        written = self.framing.write(out)
        if self._unsent is not None:
            self._unsent += written
            if counting and self._unsent > self.settings.output_limit:
                self.log.info("{peer}: slow consumer ({n} bytes unread), closing",
                              peer=self.framing.peer(), n=self._unsent)
                self.close("slow_consumer", "the client is not reading; %d bytes are "
                           "waiting. Messages stay stored" % self._unsent)

    def wait_writable(self):
        """Deferred that fires when the client is reading again."""
        if self._unsent is None or self._closing:
            return defer.succeed(None)
        d = defer.Deferred()
        if self._writable is None:
            self._writable = []
        self._writable.append(d)
        return d

    def _wake_writers(self):
        waiting, self._writable = self._writable, None
        for d in waiting or ():
            d.callback(None)

    # -- IPushProducer (the stream's flow control) ---------------------------------

    def pauseProducing(self):
        if self._unsent is None:
            self._unsent = 0
        self._pause("output")

    def resumeProducing(self):
        self._unsent = None
        self._resume("output")
        self._wake_writers()

    def stopProducing(self):
        pass

    # -- reading, stopped for a reason -------------------------------------------------

    def _pause(self, why):
        if not self._pauses and not self._closing:
            self.paused = True
            self.framing.pause()
        self._pauses = self._pauses | {why}

    def _resume(self, why):
        if why in self._pauses:
            self._pauses = self._pauses - {why}
        if not self._pauses and not self._closing and self.paused:
            self.paused = False
            self.framing.resume()
            self.feed(())
