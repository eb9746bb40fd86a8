"""
The TCP framing (plain, TLS, unix socket): one packet per line, a line ends
in ``\\n``. A thin object behind :class:`chatd.wire.framing.Framing`; the
session it feeds is :class:`chatd.wire.session.Session`.
"""

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from chatd.wire.framing import Framing
from chatd.netio import write_now


@implementer(IHalfCloseableProtocol)
class LineFraming(Framing, Protocol):
    """A TCP connection's framing, the Twisted protocol of the stream.

    A chunk read is split into lines in one pass, and every line, empty ones
    included, goes to the session (LineReceiver copies the rest of its
    buffer for each line it takes off: a chunk of ``\\n`` cost ~1 µs a byte).
    """

    _pieces = None  # [the start of a line not complete yet, in chunks]
    _partial = 0    # their length

    def __init__(self, session_class, factory):
        self.session = session_class(factory, self)

    def connectionMade(self):
        self.session.connectionMade()

    def connectionLost(self, reason):
        self.session.connectionLost(reason)

    def dataReceived(self, data):
        session = self.session
        if session.closed:
            self.discard(len(data))
            return
        lines = data.split(b"\n")
        tail = lines.pop()
        pieces = self._pieces
        if pieces and lines:
            pieces.append(lines[0])
            lines[0] = b"".join(pieces)
            pieces.clear()
            self._partial = 0
        if tail:
            if pieces is None:
                pieces = self._pieces = []
            pieces.append(tail)
            self._partial += len(tail)
            if self._partial > session.settings.max_line + 1:  # + a telnet \r
                # it cannot end within the limit: in it goes, as too long
                lines.append(b"".join(pieces))
                pieces.clear()
                self._partial = 0
        session.feed(lines)

    def write(self, out):
        if len(out) == 1 and out[0].__class__ is bytes:
            data = out[0]
        else:
            data = b"".join(item if item.__class__ is bytes else b"\n".join(item) + b"\n"
                            for item in out)
        write_now(self.transport, data)
        return len(data)

    def write_closing(self, data, code):
        self.transport.write(data)

    def readConnectionLost(self):
        """The client will send nothing more: after a closing error, finish
        closing; from a client that is done sending (``nc -N``), answer what
        it sent, then close."""
        session = self.session
        if session.closed:
            self.transport.loseConnection()
        else:
            session.when_idle().addCallback(lambda _: session.finish())

    def writeConnectionLost(self):
        """Our side is shut (see :meth:`Framing.shut`), everything written is
        out: wait for the client to hang up, or for the abort timer; a
        client that was streaming past the limit is cut now."""
        self._write_shut = True
        if self._dropped > self.session.settings.max_line:
            self.transport.abortConnection()
