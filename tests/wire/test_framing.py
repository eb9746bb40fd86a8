"""
The TCP framing (``chatd.wire.lines.LineFraming``): a chunk read is split
into lines in one pass, and every line, empty ones included, reaches the
session, in order, however the lines are cut into chunks.
"""

import pytest_twisted
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from chatd.wire.lines import LineFraming
from chatd.wire.session import Session

ensure = pytest_twisted.ensureDeferred


class Recording(Session):
    """A session whose packet_received a test may replace (a Session keeps
    its state in slots: no attribute of its own can be set)."""


def framing(node):
    """A server-side connection of the node's, on a StringTransport, whose
    session only records the lines it is handed."""
    proto = LineFraming(Recording, node.factory)
    lines = []
    proto.session.packet_received = lines.append
    proto.makeConnection(StringTransport())
    return proto, lines


@ensure
async def test_every_line_reaches_the_session_however_it_is_cut(chatd):
    node = await chatd()
    proto, lines = framing(node)
    try:
        for chunk in [b"\n\n", b'{"ping":1}\r\n', b'{"pi', b'ng":', b"2}\n", b"\n" * 100000,
                      b"x" * 10, b"y" * 10, b"\nlast"]:
            proto.dataReceived(chunk)
        assert lines[:4] == [b"", b"", b'{"ping":1}\r', b'{"ping":2}']
        assert lines[4:-1] == [b""] * 100000
        assert lines[-1] == b"x" * 10 + b"y" * 10
    finally:
        proto.connectionLost(Failure(ConnectionDone()))


@ensure
async def test_a_stream_of_newlines_reaches_the_session_line_by_line(chatd, clients):
    node = await chatd()
    c = await clients(node)
    await c.register("newlines")
    [conn] = node.factory.connections
    count = [0]
    framing = conn.framing

    class Counting:
        """The live session as its framing sees it, every line counted."""

        def __getattr__(self, name):
            return getattr(conn, name)

        def feed(self, lines):
            count[0] += len(lines)
            conn.feed(lines)

    framing.session = Counting()
    c.send(b"\n" * (1 << 18) + b'{"ping":"after"}\n')
    await c.expect("pong", ping="after")
    assert count[0] == (1 << 18) + 1


@ensure
async def test_an_incomplete_line_is_too_long_once_it_cannot_end_in_time(chatd, clients):
    node = await chatd(max_line=1024)
    c = await clients(node)
    ping = b'{"ping":"' + b"x" * 1013 + b'"}'  # 1024 bytes
    c.send(ping + b"\r")  # the most an incomplete line may hold: a full one and a \r
    c.send(b"\n")
    await c.expect("pong")
    d = await clients(node)
    d.send(ping + b"\r" + b"x")  # one byte more, still without its \n
    await d.error("line_too_long")
    await d.wait_closed()
