"""
The small interface between a session and its framing, and what both
framings share: the byte stream under them.

A framing (:mod:`chatd.wire.lines` for TCP, :mod:`chatd.wire.websocket`)
turns the bytes read into packets for its :class:`chatd.wire.session.Session`
(``session.feed``, in order, empty lines included), and the session's
ready-made server lines into bytes. The session sees only this:

- ``write(out)``: now, what the session gathered in a turn, in order: server
  lines (bytes ending in ``\\n``) and batches of push lines (sequences of
  bytes without their newline); it returns the bytes written;
- ``write_closing(data, code)``: the closing error, and whatever the framing
  sends before its stream is shut;
- ``pause()``, ``resume()``, ``abort()``, ``shut()``: the stream;
- ``attach(producer)`` at start, ``keepalive()`` after the session's ping,
  ``peer()`` for the logs.
"""

from twisted.internet import abstract


class Framing:
    """One connection's framing over ``transport``: the TCP, TLS or unix
    socket stream (under the WebSocket, for that framing). Subclasses set
    ``session`` and ``transport`` and supply :meth:`write` and
    :meth:`write_closing`.

    While the session closes, what the client still sends is read and
    dropped (:meth:`discard`), up to a line's worth."""

    session = None
    transport = None
    _dropped = 0        # bytes read and dropped while closing
    _write_shut = False  # our sending side is shut and everything is out

    def write(self, out):
        raise NotImplementedError

    def write_closing(self, data, code):
        raise NotImplementedError

    def attach(self, producer):
        """The stream is the session's now: ``producer`` (the session) is told
        when the client stops reading and starts again."""
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, NotImplementedError, OSError):
            pass  # not TCP (unix socket)
        self.transport.registerProducer(producer, True)

    def keepalive(self):
        """The session pinged a silent client; a framing with a ping of its
        own sends it too."""

    def pause(self):
        self.transport.pauseProducing()

    def resume(self):
        self.transport.resumeProducing()

    def abort(self):
        self.transport.abortConnection()

    def shut(self):
        """After the closing error: on plain TCP only the sending side is shut
        at first, and what the client still sends is read and dropped until
        it hangs up (closing a socket with unread input makes the kernel
        reset the connection, and the error line could be lost with it)."""
        if isinstance(self.transport, abstract.FileDescriptor):
            self.transport.loseWriteConnection()
            self.transport.resumeProducing()
        else:
            self.transport.loseConnection()  # TLS: a close_notify, then close

    def discard(self, n):
        """Closing: ``n`` bytes read are dropped, up to a line's worth; a
        client that keeps streaming after that is cut once the closing error
        is out."""
        self._dropped += n
        if self._dropped > self.session.settings.max_line:
            if self._write_shut:
                self.transport.abortConnection()
            else:
                self.transport.pauseProducing()

    def peer(self):
        try:
            peer = self.transport.getPeer()
            return "%s:%s" % (peer.host, peer.port)
        except Exception:
            return "?"
