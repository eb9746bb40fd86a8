"""
Test clients of chatd: the line client, in the reactor (:class:`LineClient`,
:func:`connect`; every wait with a deadline) or blocking
(:class:`BlockingLineClient`, for plain test functions that drive a twistd
chatd), an HTTP GET, and a recording UI for the terminal client's session.
(The WebSocket client is tests/wsclient.py.)
"""

import json
import socket
import time
import urllib.error
import urllib.request

from tests.helpers import DEADLINE, with_deadline


def encode_line(packet):
    """A packet as the line sent: a dict as JSON, a str as is, bytes as given."""
    if isinstance(packet, dict):
        return json.dumps(packet).encode() + b"\n"
    if isinstance(packet, str):
        return packet.encode() + b"\n"
    return packet


def check_line(msg, type, fields):
    """msg, which must have this type and these field values."""
    assert msg.get("type") == type, "expected %s, got %r" % (type, msg)
    for k, v in fields.items():
        assert msg.get(k) == v, "expected %s=%r in %r" % (k, v, msg)
    return msg


class LineClient:
    """A test client: send packets, await each server line as a dict."""

    def __init__(self):
        from twisted.internet import defer
        self.lines = defer.DeferredQueue()
        self.raw = []
        self.closed = defer.Deferred()
        self.proto = None

    def send(self, packet):
        self.proto.transport.write(encode_line(packet))

    async def next(self, timeout=DEADLINE):
        line = await with_deadline(self.lines.get(), timeout, "line from the server")
        if line is None:
            raise AssertionError("the server closed the connection")
        return json.loads(line)

    async def expect(self, type, timeout=DEADLINE, **fields):
        """The next line; it must have this type (and these field values)."""
        return check_line(await self.next(timeout), type, fields)

    async def error(self, code, timeout=DEADLINE):
        return await self.expect("error", timeout, code=code)

    async def sync(self, timeout=DEADLINE):
        """Round trip a ping; return every line that arrived before the pong."""
        marker = "sync-%f" % time.monotonic()
        self.send({"ping": marker})
        before = []
        while True:
            msg = await self.next(timeout)
            if msg.get("type") == "pong" and msg.get("ping") == marker:
                return before
            before.append(msg)

    async def register(self, device, **extra):
        self.send(dict({"register": "true", "sender": device}, **extra))
        msg = await self.expect("registered", sender=device)
        self.device, self.token = device, msg["token"]
        return msg["token"]

    async def reconnect(self, device, token, **extra):
        self.send(dict({"reconnect": "true", "sender": device, "token": token}, **extra))
        return await self.expect("reconnected", sender=device)

    async def wait_closed(self, timeout=DEADLINE):
        await with_deadline(self.closed, timeout, "close")

    async def close(self):
        if self.proto is not None and self.proto.transport.connected:
            self.proto.transport.abortConnection()
        await with_deadline(self.closed, DEADLINE, "close")


def _client_protocol(client):
    from twisted.protocols.basic import LineReceiver

    class P(LineReceiver):
        delimiter = b"\n"
        MAX_LENGTH = 1 << 24

        def connectionMade(self):
            client.proto = self

        def lineReceived(self, line):
            client.raw.append(line)
            client.lines.put(line)

        def connectionLost(self, reason):
            client.lines.put(None)
            if not client.closed.called:
                client.closed.callback(None)

    return P()


async def connect(port, host="127.0.0.1"):
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    client = LineClient()
    await with_deadline(connectProtocol(TCP4ClientEndpoint(reactor, host, port),
                                        _client_protocol(client)), DEADLINE, "connection")
    return client


class BlockingLineClient:
    """The same client, blocking (for tests that drive a twistd chatd from
    plain test functions): send packets, read server lines."""

    def __init__(self, port, timeout=DEADLINE):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.token = None

    def send(self, packet):
        self.sock.sendall(encode_line(packet))

    def recv(self):
        """The next server line as a dict; None once the server closed."""
        line = self.file.readline()
        return json.loads(line) if line else None

    def expect(self, type, **fields):
        msg = self.recv()
        assert msg is not None, "the server closed the connection"
        return check_line(msg, type, fields)

    def register(self, device):
        self.send({"register": "true", "sender": device})
        self.token = self.expect("registered", sender=device)["token"]
        return self.token

    def message(self, receiver, text, ref=None):
        """Send a message; its reply."""
        self.send({"message": text, "receiver": receiver, "ref": ref})
        return self.recv()

    def close(self):
        self.file.close()
        self.sock.close()


def http_get(url, timeout=DEADLINE):
    """(status, body bytes) of a GET; HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class RecordingUi:
    def __init__(self):
        self.notices, self.problems, self.shown, self.answers, self.fatals = [], [], [], [], []
        self.receipts = []

    def notice(self, text):
        self.notices.append(text)

    def problem(self, text):
        self.problems.append(text)

    def incoming(self, push, raw):
        self.shown.append(push["message"])

    def receipt(self, push, raw):
        self.receipts.append((push["status"], push["upto"]))

    def answered(self, entry, reply):
        self.answers.append((entry.text, reply["type"]))

    def fatal(self, status, text):
        self.fatals.append((status, text))
