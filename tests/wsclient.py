"""
A WebSocket test client for chatd's ``/ws``: the same API as
:class:`tests.helpers.LineClient` (send a packet, await each server line as
a dict), one packet per text frame. It is a raw client (wsproto on a Twisted
TCP connection, no WebSocket framework of chatd's), so that a test can also
send frames no well-behaved client would (binary, invalid UTF-8, oversize),
and see the server's close code, its ping frames and the frame boundaries.
"""

import json
import struct

from twisted.internet import defer, protocol
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Ping,
                            RejectConnection, Request, TextMessage)

from tests.clients import LineClient
from tests.helpers import DEADLINE, with_deadline

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def frame_header(opcode, n, fin=True):
    """The header of a client frame of n bytes (masked, with a zero key, so
    that the payload goes on the wire as is)."""
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + b"\0\0\0\0"


def frame(opcode, payload, fin=True):
    """A client frame as the wire carries it."""
    return frame_header(opcode, len(payload), fin) + payload


def handshake(host="127.0.0.1", path="/ws"):
    """The bytes of an upgrade request (for raw sockets)."""
    return WSConnection(ConnectionType.CLIENT).send(Request(host=host, target=path))


class WsClient(LineClient):
    def __init__(self):
        super().__init__()
        self.opened = defer.Deferred()
        self.frames = []           # every text frame, as received
        self.pings = 0             # ping frames received
        self.close_code = None     # from the server's close frame
        self.close_reason = None
        self.binary = []

    def send(self, packet):
        """A packet as one text frame (a dict, str, or bytes sent as they are)."""
        if isinstance(packet, dict):
            packet = json.dumps(packet)
        if isinstance(packet, bytes):
            self.send_raw(frame(TEXT, packet))
        else:
            self.proto.write_event(TextMessage(data=packet))

    def send_raw(self, data):
        self.proto.transport.write(data)

    async def wait_closed(self, timeout=DEADLINE):
        await with_deadline(self.closed, timeout, "close")
        return self.close_code, self.close_reason


class _WsProtocol(protocol.Protocol):
    def __init__(self, client, path):
        self.client = client
        self.path = path
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._text = []

    def connectionMade(self):
        self.client.proto = self
        self.transport.write(self.ws.send(Request(host="127.0.0.1", target=self.path)))

    def write_event(self, event):
        self.transport.write(self.ws.send(event))

    def dataReceived(self, data):
        c = self.client
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, AcceptConnection):
                c.opened.callback(self)
            elif isinstance(event, RejectConnection):
                c.opened.errback(AssertionError("rejected: %s" % event.status_code))
            elif isinstance(event, TextMessage):
                self._text.append(event.data)
                if event.message_finished:
                    text, self._text = "".join(self._text), []
                    c.frames.append(text)
                    c.raw.append(text.encode())
                    c.lines.put(text.encode())
            elif isinstance(event, BytesMessage):
                c.binary.append(event.data)
            elif isinstance(event, Ping):
                c.pings += 1
                self.write_event(event.response())
            elif isinstance(event, CloseConnection):
                c.close_code, c.close_reason = event.code, event.reason
                if self.ws.state is not ConnectionState.CLOSED:
                    self.write_event(event.response())
                # the server closes the TCP connection first (RFC 6455, 7.1.1)

    def connectionLost(self, reason):
        c = self.client
        c.lines.put(None)
        if not c.opened.called:
            c.opened.errback(AssertionError("closed before the upgrade"))
        if not c.closed.called:
            c.closed.callback(None)


def ws_port(node):
    return node.service.web_ports[0].getHost().port


async def ws_connect(port, path="/ws", tls=None):
    """A WsClient on ws://127.0.0.1:port/ws (wss:// with ``tls``, client TLS options)."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol
    client = WsClient()
    if tls is None:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    else:
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, tls)
    await with_deadline(connectProtocol(endpoint, _WsProtocol(client, path)), DEADLINE,
                        "connection")
    await with_deadline(client.opened, DEADLINE, "WebSocket upgrade")
    return client
