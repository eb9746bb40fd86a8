"""
Issue 23 ("Hold up, round two"), the ``--websocket`` listener through real
sockets: one message's fragments bounded by --max-line whatever control
frames come between them (1); the Origin rule of the handshake, and a page
that is never framed (2); the HTTP side (6): a NUL in a path, the access
log, ``/ws`` without an upgrade, many ranges, HTTP connections counted and
cut, 503 at the cap, and a warning for metrics beyond loopback.

(The same in a real browser: tests/test_browser_holdup.py.)
"""

import socket

import pytest
import pytest_twisted
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request

from tests.helpers import pass_time, wait_until
from tests.wsclient import PING, PONG, TEXT, frame, ws_connect, ws_port

ensure = pytest_twisted.ensureDeferred
WS = ("tcp:0:interface=127.0.0.1",)


@pytest_twisted.async_yield_fixture
async def logged():
    """Every log event while the test runs (``logged`` is the list)."""
    from twisted.logger import globalLogPublisher
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def _text(event):
    from twisted.logger import formatEvent
    return formatEvent(event) or ""


def _bad(events):
    """Events at error or critical level, or carrying a traceback."""
    from twisted.logger import LogLevel
    return [_text(e) or repr(e) for e in events
            if e.get("log_failure") is not None or e.get("isError")
            or e.get("log_level") in (LogLevel.error, LogLevel.critical)]


def _exchange(port, data, timeout=5.0, head_only=False):
    """Send raw bytes, read until the server closes (or the timeout; or,
    ``head_only``, until the answer's head is in: a refused handshake's
    connection is kept alive)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        got = []
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            got.append(chunk)
            if head_only and b"\r\n\r\n" in b"".join(got):
                break
        return b"".join(got)
    finally:
        s.close()


async def http(port, data, timeout=5.0, head_only=False):
    """The raw answer to a raw request (in a thread: the reactor serves it)."""
    from twisted.internet import threads
    return await threads.deferToThread(_exchange, port, data, timeout, head_only)


def get(path, *headers):
    return ("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n%s\r\n"
            % (path, "".join(h + "\r\n" for h in headers))).encode("latin-1")


def status(answer):
    return int(answer.split(b" ", 2)[1])


def header(answer, name):
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def body(answer):
    return answer.split(b"\r\n\r\n", 1)[1]


def upgrade(port, origin=None, host=None):
    """The bytes of a WebSocket handshake, with an Origin header if given."""
    extra = [("Origin", origin)] if origin is not None else []
    return WSConnection(ConnectionType.CLIENT).send(Request(
        host=host or "127.0.0.1:%d" % port, target="/ws", extra_headers=extra))


# -- 1. one message's fragments, whatever comes between them ------------------------

@ensure
async def test_pongs_between_fragments_do_not_reset_the_size_of_a_message(chatd):
    """A pong between continuation frames reset the count: 500 fragments of
    60 KB were taken in as one 30 MB message. Now the message is refused as
    line_too_long (1009) as soon as its fragments pass --max-line, before it
    ends, with pongs, pings or nothing between them."""
    for between in (frame(PONG, b"reset?"), frame(PING, b"p"), b""):
        node = await chatd(websocket=WS, max_line=4096)
        c = await ws_connect(ws_port(node))
        try:
            c.send_raw(frame(TEXT, b'{"ping":"' + b"a" * 3000, fin=False))
            for _ in range(50):  # 150 KB, never finished
                if c.close_code is not None:
                    break
                c.send_raw(between + frame(0x0, b"a" * 3000, fin=False))
                await pass_time(0.01)
            assert await c.wait_closed(5) == (1009, "line_too_long"), between
            assert '"line_too_long"' in c.frames[-1]
        finally:
            await c.close()


@ensure
async def test_a_client_that_only_pings_is_never_cut_by_the_size_accounting(chatd):
    """Pings and pongs are no part of a message: a client may send them for
    hours (here 30 KB of pings, then as many pongs, with --max-line 1024)
    and stay."""
    node = await chatd(websocket=WS, max_line=1024)
    c = await ws_connect(ws_port(node))
    try:
        await c.register("pinger")
        for kind in (PING, PONG):
            for i in range(300):
                c.send_raw(frame(kind, b"k" * 100))
                if i % 50 == 0:
                    await pass_time(0.01)
        c.send({"ping": "still here"})
        await c.expect("pong", ping="still here")
        assert c.close_code is None and "pinger" in node.hub.sessions
        # and a message in fragments, pongs between them, within the limit
        c.send_raw(frame(TEXT, b'{"ping":', fin=False) + frame(PONG, b"x")
                   + frame(0x0, b'"ok"', fin=False) + frame(PING, b"y")
                   + frame(0x0, b"}"))
        await c.expect("pong", ping="ok")
    finally:
        await c.close()


def test_a_message_is_gathered_in_linear_time():
    """The buffer of one message takes its pieces in a list (Twisted's does
    ``data += new``) and keeps none past its limit."""
    from chatd.wire.websocket import MessageBuffer
    over = []
    b = MessageBuffer("", 10, lambda: over.append(1))
    b.add("ab")
    b.add("é" * 4)  # 8 bytes of UTF-8: 10 in all
    assert b.done() == "abéééé" and not over
    b.add("x" * 11)
    b.add("more")
    assert over == [1] and b.done() is None
    b.add("fine")
    assert b.done() == "fine"


# -- 2. the Origin of a WebSocket handshake ----------------------------------------------

@ensure
async def test_a_foreign_origin_is_refused_with_403_before_any_packet(chatd):
    node = await chatd(websocket=WS, websocket_origins=("https://chat.example.com",))
    port = ws_port(node)
    answer = await http(port, upgrade(port, "http://evil.example"), head_only=True)
    assert status(answer) == 403, answer[:200]
    assert not node.factory.connections
    for origin in ("null", "http://127.0.0.1:%d.evil.example" % port,
                   "https://127.0.0.1:%d" % port,  # the listener is http, not https
                   "http://127.0.0.1:%d" % (port + 1)):
        assert status(await http(port, upgrade(port, origin), head_only=True)) == 403, origin
    # its own origin, as the browser reached it (the Host header), default
    # ports normalised; one listed with --websocket-origin; none at all
    for origin, host in [("http://127.0.0.1:%d" % port, None),
                         ("http://LOCALHOST:%d" % port, "localhost:%d" % port),
                         ("http://chat.local", "chat.local:80"),
                         ("https://chat.example.com", None),
                         ("https://chat.example.com:443", None),
                         (None, None)]:
        answer = await http(port, upgrade(port, origin, host), head_only=True)
        assert status(answer) == 101, (origin, answer[:200])


def test_websocket_origin_is_checked_at_start():
    from twisted.python import usage

    from chatd.app.tap import Options
    o = Options()
    o.parseOptions(["--websocket", "8080", "--websocket-origin", "https://chat.example.com",
                    "--websocket-origin", "http://10.0.0.5:8080"])
    assert o.settings.websocket_origins == ("https://chat.example.com", "http://10.0.0.5:8080")
    assert Options().parseOptions([]) is None
    for bad in ("chat.example.com", "ftp://chat.example.com", "https://chat.example.com/app",
                "https://user@chat.example.com", "https://chat.example.com:99999", "null"):
        with pytest.raises(usage.UsageError, match="--websocket-origin"):
            Options().parseOptions(["--websocket-origin", bad])


@ensure
async def test_the_page_may_not_be_framed(chatd):
    node = await chatd(websocket=WS)
    for path in ("/", "/chat.js", "/nope"):
        answer = await http(ws_port(node), get(path))
        assert header(answer, "X-Frame-Options") == "DENY", path
        assert "frame-ancestors 'none'" in header(answer, "Content-Security-Policy"), path


# -- 6. the HTTP side ------------------------------------------------------------------

@ensure
async def test_a_nul_in_a_path_is_a_404_without_a_traceback(chatd, logged):
    node = await chatd(websocket=WS)
    for path in ("/chat.js%00.html", "/%00", "/chat%ff.js"):
        for _ in range(3):
            assert status(await http(ws_port(node), get(path))) == 404, path
    assert not _bad(logged)


@ensure
async def test_no_access_log_unless_asked(chatd, logged):
    node = await chatd(websocket=WS)
    assert status(await http(ws_port(node), get("/chat.css"))) == 200
    assert not [e for e in logged if "chat.css" in _text(e)]
    loud = await chatd(websocket=WS, access_log=True)
    assert status(await http(ws_port(loud), get("/chat.css"))) == 200
    await wait_until(lambda: [e for e in logged if '"GET /chat.css HTTP/1.1" 200' in _text(e)],
                     what="an access-log line")


@ensure
async def test_ws_without_an_upgrade_is_a_plain_426_without_an_error(chatd, logged):
    node = await chatd(websocket=WS)
    answer = await http(ws_port(node), get("/ws"))
    assert status(answer) == 426 and header(answer, "Upgrade") == "websocket"
    bad = await http(ws_port(node), get("/ws", "Upgrade: websocket", "Connection: Upgrade"))
    assert status(bad) == 400  # an upgrade without its key and version
    assert not _bad(logged)


@ensure
async def test_many_ranges_get_the_whole_file_once(chatd):
    node = await chatd(websocket=WS)
    whole = body(await http(ws_port(node), get("/chat.js")))
    ranges = "Range: bytes=" + ",".join(["0-%d" % (len(whole) - 1)] * 100)
    answer = await http(ws_port(node), get("/chat.js", ranges))
    assert status(answer) == 200 and body(answer) == whole
    one = await http(ws_port(node), get("/chat.js", "Range: bytes=0-9"))
    assert status(one) == 206 and body(one) == whole[:10]


@ensure
async def test_http_connections_are_counted_and_cut_at_the_auth_timeout(chatd):
    from twisted.internet import threads
    node = await chatd(websocket=WS, max_connections=2, auth_timeout=1.0)
    port = ws_port(node)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        await wait_until(lambda: len(node.factory.http) == 2, what="two HTTP connections")
        # at the cap: a WebSocket is refused before the upgrade
        answer = await http(port, upgrade(port))
        assert status(answer) == 503, answer[:200]
        assert b"too_many_connections" in body(answer)
        assert not node.factory.connections

        def cut(s):
            s.settimeout(10)
            try:
                return s.recv(100)
            except ConnectionResetError:
                return b""
        # cut at the auth timeout, not Twisted's 60 s
        for s in idle:
            assert await threads.deferToThread(cut, s) == b""
    finally:
        for s in idle:
            s.close()
    await wait_until(lambda: not node.factory.http, what="the HTTP connections released")
    # an upgraded connection is counted once, as its session
    a = await ws_connect(port)
    b = await ws_connect(port)
    try:
        await a.register("one")
        await b.register("two")
        assert len(node.factory.connections) == 2 and not node.factory.http
        await pass_time(1.5)  # past the auth timeout: sessions are not cut as HTTP
        b.send({"ping": 2})
        await b.expect("pong")
        assert status(await http(port, upgrade(port))) == 503
    finally:
        await a.close()
        await b.close()


@ensure
async def test_metrics_beyond_loopback_get_a_warning(chatd, logged):
    from chatd.ops.metrics import MetricsService
    node = await chatd()
    for where, warned in (("tcp:0:interface=127.0.0.1", False), ("tcp:0", True)):
        metrics = MetricsService(where, node.service)
        metrics.startService()
        try:
            await metrics._listening
            warnings = [e for e in logged if "other machines can reach" in _text(e)
                        and "metrics" in _text(e)]
            assert bool(warnings) == warned, where
        finally:
            await metrics.stopService()
