"""
One write per connection per turn of the reactor, straight to the socket.

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

from chatd.netio import write_now  # noqa: F401 (the sessions' writer)


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
