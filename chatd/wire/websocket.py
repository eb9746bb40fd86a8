"""
The ``--websocket`` listener: a twisted.web site that speaks the chat
protocol at ``/ws`` and serves the chat page (``chatd/page/``) at ``/``.

It exists so that browsers, and networks that pass only HTTP(S), reach the
same service as TCP clients. :class:`WebSocketFraming` is the WebSocket
framing (:mod:`chatd.wire.framing`) of the one session class,
:class:`chatd.wire.session.Session`: one packet per text frame in, one
server line per text frame out; everything else (hub, limits, timers, rate
limit, flow control, errors, shutdown) is the session's. The WebSocket
itself is Twisted's own (:mod:`twisted.web.websocket`, on wsproto).

Close codes (RFC 6455, 7.4.1) are in :data:`CLOSE_CODES` and in
docs/protocol.rst.
"""

import os

from twisted.web import server, static
from twisted.web.websocket import WebSocketResource
from wsproto.frame_protocol import FrameProtocol
from wsproto.utilities import LocalProtocolError

from chatd.wire.framing import Framing
from chatd.wire.session import Session, too_long_reason

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page")

#: the close code sent after each closing error (any other: 1000). Frames
#: that are not WebSocket get 1002, text that is not UTF-8 1007, from wsproto.
CLOSE_CODES = {
    "line_too_long": 1009,  # message too big
    "bad_packet": 1003,     # a binary frame: data of a kind we do not accept
    "shutdown": 1001,       # going away
}


class WebSocketFraming(Framing):
    """The WebSocket framing of a session (a Twisted ``WebSocketProtocol``):
    one text frame in is one packet, one server line out is one text frame.

    ``transport`` (what is paused, half-closed and aborted) is the TCP/TLS
    stream under the WebSocket; ``ws`` is the WebSocket on it."""

    ws = None

    def __init__(self, factory, request):
        self.session = Session(factory, self)
        self._channel = request.channel
        self._received = 0  # bytes read since the last whole message

    # -- twisted.web.websocket.WebSocketProtocol ------------------------------------

    def negotiationStarted(self, ws):
        self.ws = ws

    def negotiationFinished(self):
        channel = self._channel
        self.transport = channel.transport
        channel.setTimeout(None)  # the HTTP idle timer; the session has its own
        self.transport.unregisterProducer()  # the HTTP channel's: the session's follows
        # every byte read passes here first (Twisted points the channel's
        # dataReceived at the WebSocket when it upgrades): it is activity,
        # ping and pong frames included, and it is counted, so that a message
        # past the limit is refused before it is buffered whole
        frames_in = channel.dataReceived
        channel.dataReceived = lambda data: self._stream_in(data, frames_in)
        self.session.connectionMade()

    def connectionLost(self, reason):
        self.session.connectionLost(reason)

    def textMessageReceived(self, text):
        self._received = 0
        self.session.feed((text.encode("utf-8"),))

    def bytesMessageReceived(self, data):
        self._received = 0
        self.session.close_in_turn(
            "bad_packet", "a binary frame; chatd reads one JSON packet per text frame")

    def pongReceived(self, payload):
        self._received = 0

    # -- framing ---------------------------------------------------------------------

    def _stream_in(self, data, frames_in):
        session = self.session
        if session.closed:
            # keep reading frames (the client's close frame ends the closing
            # handshake), a line's worth at most
            self.discard(len(data))
        else:
            session.touch()
            self._received += len(data)
        frames_in(data)
        # bytes of one message still incomplete: frame headers and control
        # frames count too, so allow as much again before cutting
        max_line = session.settings.max_line
        if self._received > 2 * max_line and not session.closed:
            self._received = 0
            session.close_in_turn("line_too_long", too_long_reason(max_line))

    def write(self, out):
        """One text frame per server line: the session hands them over one by
        one, or as a batch of push lines."""
        written = 0
        try:
            for item in out:
                if item.__class__ is bytes:
                    self.ws.sendTextMessage(item[:-1].decode("utf-8"))
                    written += len(item)
                else:
                    for line in item:
                        self.ws.sendTextMessage(line.decode("utf-8"))
                        written += len(line) + 1
        except LocalProtocolError:
            pass  # the client has sent its close frame: it reads nothing more
        return written

    def write_closing(self, data, code):
        self.write((data,))
        # written on the stream, not through the WebSocket (whose close would
        # shut the socket at once, with the client's unread input in it: the
        # kernel would reset the connection, and the error might be lost)
        self.transport.write(bytes(FrameProtocol(False, []).close(
            CLOSE_CODES.get(code, 1000), code)))

    def keepalive(self):
        try:
            self.ws.ping(b"")  # a browser answers by itself: that is activity too
        except LocalProtocolError:
            pass


class _Sessions:
    """The WebSocketServerFactory of ``/ws``: a session per upgraded request."""

    def __init__(self, chat_factory):
        self.chat_factory = chat_factory

    def buildProtocol(self, request):
        return WebSocketFraming(self.chat_factory, request)


def site(chat_factory):
    """The web site of a ``--websocket`` listener: the page, and ``/ws``."""
    root = static.File(PAGE)
    root.putChild(b"ws", WebSocketResource(_Sessions(chat_factory)))
    return server.Site(root)
