"""
The chat protocol over WebSocket, at ``/ws`` of a ``--websocket`` listener
(whose HTTP side, the page and the handshake, is :mod:`chatd.wire.web`).

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

from wsproto.frame_protocol import FrameProtocol
from wsproto.utilities import LocalProtocolError

from chatd.wire.framing import Framing
from chatd.wire.session import Session, too_long_reason

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

    # -- twisted.web.websocket.WebSocketProtocol ------------------------------------

    def negotiationStarted(self, ws):
        self.ws = ws
        # Twisted internals (twisted.web._websocket_impl, 25.5-26.x): the wire
        # protocol gathers a message's fragments in ``_textBuffer`` and
        # ``_bytesBuffer`` with ``data += new`` (quadratic) and without a
        # limit. Ours hold one message of --max-line at most, whatever control
        # frames come between its fragments, and take the pieces in a list.
        max_line = self.session.factory.settings.max_line
        ws._textBuffer = MessageBuffer("", max_line, self._too_long)
        ws._bytesBuffer = MessageBuffer(b"", max_line, self._too_long)

    def negotiationFinished(self):
        channel = self._channel
        self.transport = channel.transport
        channel.setTimeout(None)  # the HTTP idle timer; the session has its own
        upgraded = getattr(channel, "upgraded", None)
        if upgraded is not None:
            upgraded()  # counted as a session from now on (chatd.wire.web.Channel)
        self.transport.unregisterProducer()  # the HTTP channel's: the session's follows
        # every byte read passes here first (Twisted points the channel's
        # dataReceived at the WebSocket when it upgrades): it is activity,
        # ping and pong frames included
        frames_in = channel.dataReceived
        channel.dataReceived = lambda data: self._stream_in(data, frames_in)
        self.session.connectionMade()

    def connectionLost(self, reason):
        self.session.connectionLost(reason)

    def textMessageReceived(self, text):
        if text is not None:  # None: it was too long, and refused as it came
            self.session.feed((text.encode("utf-8"),))

    def bytesMessageReceived(self, data):
        if data is not None:
            self.session.close_in_turn(
                "bad_packet", "a binary frame; chatd reads one JSON packet per text frame")

    def pongReceived(self, payload):
        pass  # activity, as every frame (_stream_in)

    def _too_long(self):
        if not self.session.closed:
            self.session.close_in_turn(
                "line_too_long", too_long_reason(self.session.settings.max_line))

    # -- framing ---------------------------------------------------------------------

    def _stream_in(self, data, frames_in):
        session = self.session
        if session.closed:
            # keep reading frames (the client's close frame ends the closing
            # handshake), a line's worth at most
            self.discard(len(data))
        else:
            session.touch()
        frames_in(data)

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


class MessageBuffer:
    """One incoming message, fragment by fragment (the ``add``/``done`` of
    Twisted's ``Buffer``): at most ``limit`` bytes (UTF-8, for text) are
    kept; past that, ``too_long()`` is called once and the rest of the
    message is dropped as it comes, and ``done()`` gives None for it."""

    __slots__ = ("_empty", "_limit", "_too_long", "_pieces", "_size", "_over")

    def __init__(self, empty, limit, too_long):
        self._empty = empty
        self._limit = limit
        self._too_long = too_long
        self._pieces = []
        self._size = 0
        self._over = False

    def add(self, new):
        if self._over or not new:
            return
        if new.__class__ is str and not new.isascii():
            self._size += len(new.encode("utf-8", "surrogatepass"))
        else:
            self._size += len(new)
        if self._size > self._limit:
            self._over = True
            self._pieces.clear()
            self._too_long()
            return
        self._pieces.append(new)

    def done(self):
        pieces = self._pieces
        result = None if self._over else (
            pieces[0] if len(pieces) == 1 else self._empty.join(pieces))
        self._pieces = []
        self._size = 0
        self._over = False
        return result


class Sessions:
    """The WebSocketServerFactory of ``/ws``: a session per upgraded request."""

    def __init__(self, chat_factory):
        self.chat_factory = chat_factory

    def buildProtocol(self, request):
        return WebSocketFraming(self.chat_factory, request)
