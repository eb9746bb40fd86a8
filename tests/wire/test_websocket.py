"""
The protocol over WebSocket (``--websocket``, path ``/ws``) through real
sockets and the real store: every packet kind, the errors, WebSocket and TCP
clients talking both ways, bad frames and their close codes, a reader that
stops reading, takeover between a WebSocket and a TCP connection of one id,
ping/pong as activity, shutdown; and the page being served.
"""

import json
import socket

import pytest
import pytest_twisted

from tests.helpers import DEADLINE, pass_time, send_until_cut, wait_until, with_deadline
from tests.wsclient import (BINARY, PING, TEXT, frame, frame_header, handshake, ws_connect,
                            ws_port)

ensure = pytest_twisted.ensureDeferred
WS = ("tcp:0:interface=127.0.0.1",)


@pytest_twisted.async_yield_fixture
async def web(chatd, clients):
    """``node = await web.node(**settings)``; ``await web.ws(node)``, ``await web.tcp(node)``."""
    opened = []

    class Web:
        async def node(self, **settings):
            return await chatd(websocket=WS, **settings)

        async def ws(self, node, path="/ws", tls=None):
            c = await ws_connect(ws_port(node), path, tls)
            opened.append(c)
            return c

        async def tcp(self, node):
            return await clients(node)

    yield Web()
    for c in opened:
        await c.close()


# -- every packet kind --------------------------------------------------------------

@ensure
async def test_every_packet_kind_one_text_frame_each(web, redis):
    node = await web.node()
    a = await web.ws(node)
    b = await web.ws(node)
    token = await a.register("alice")
    await b.register("bob")
    a.send({"message": "hi bob", "receiver": "bob", "ref": "r1"})
    accepted = await a.expect("accepted", receiver="bob", ref="r1")
    push = await b.expect("message", sender="alice", message="hi bob", id=accepted["id"])
    assert isinstance(push["sent_at"], int)
    a.send({"message": "hi bob", "receiver": "bob"})
    await a.expect("duplicate", receiver="bob")
    b.send({"ack": push["id"]})
    await wait_until(lambda: redis.command("LLEN", "chatd:{bob}:inbox") == 0)
    a.send({"ping": "ünï"})
    await a.expect("pong", ping="ünï")
    # one line per frame, without its newline, compact JSON
    assert a.frames and all(not f.endswith(("\n", " ")) and json.loads(f)["type"]
                            for f in a.frames + b.frames)
    # reconnect on a new WebSocket
    await a.close()
    c = await web.ws(node)
    await c.reconnect("alice", token)
    c.send({"message": "back", "receiver": "bob"})
    await c.expect("accepted")
    await b.expect("message", message="back")


@ensure
async def test_pipelined_frames_are_answered_in_order(web):
    """Frames that arrive in one read while a register is stored wait their turn."""
    node = await web.node()
    b = await web.ws(node)
    await b.register("bob")
    a = await web.ws(node)
    a.send_raw(b"".join(frame(TEXT, json.dumps(p).encode()) for p in [
        {"register": "true", "sender": "alice"},
        {"message": "one", "receiver": "bob", "ref": 1},
        {"bogus": "x", "ref": "b"},
        {"message": "two", "receiver": "bob", "ref": 2}]))
    assert [(m["type"], m.get("ref")) for m in [await a.next() for _ in range(4)]] == [
        ("registered", None), ("accepted", 1), ("error", "b"), ("accepted", 2)]
    assert [(await b.next())["message"] for _ in range(2)] == ["one", "two"]


@pytest.mark.parametrize("packet, code", [
    ("hello", "bad_packet"),
    ("{'register': 'true', 'sender': __import__('os')}", "bad_packet"),
    ("{}", "unknown_packet"),
    ('{"register": "true"}', "missing_field"),
    ('{"register": "true", "sender": "bad id!"}', "bad_field"),
    ('{"message": "x", "receiver": "b"}', "not_registered"),
    ('{"reconnect": "true", "sender": "a", "token": "nope"}', "bad_token"),
    ('{"ack": "0000000000000001"}', "not_registered"),
    ("", None),  # an empty frame is an empty line: nothing
])
@ensure
async def test_bad_packets_get_the_error_and_the_connection_stays(web, packet, code):
    node = await web.node()
    c = await web.ws(node)
    c.send(packet)
    if code:
        e = await c.error(code)
        assert set(e) >= {"type", "code", "reason", "ref"}
    await c.register("still-works")
    assert c.close_code is None


@ensure
async def test_message_errors(web):
    node = await web.node(max_message=100)
    a = await web.ws(node)
    await a.register("alice")
    a.send({"message": "x", "receiver": "nobody", "ref": "u"})
    assert (await a.error("unknown_receiver"))["ref"] == "u"
    a.send({"message": "é" * 51, "receiver": "alice"})  # 102 bytes of UTF-8
    await a.error("message_too_long")
    a.send({"message": "x", "receiver": "alice", "sender": "mallory"})
    await a.error("forbidden")


# -- WebSocket <-> TCP -------------------------------------------------------------------

@ensure
async def test_websocket_and_tcp_clients_talk_both_ways(web):
    node = await web.node()
    w = await web.ws(node)
    t = await web.tcp(node)
    await w.register("browser")
    await t.register("phone")
    w.send({"message": "from the browser", "receiver": "phone"})
    await w.expect("accepted")
    await t.expect("message", sender="browser", message="from the browser")
    t.send({"message": "from the phone", "receiver": "browser"})
    await t.expect("accepted")
    await w.expect("message", sender="phone", message="from the phone")


@ensure
async def test_waiting_messages_reach_a_websocket_reconnect(web):
    node = await web.node()
    w = await web.ws(node)
    token = await w.register("browser")
    await w.close()
    t = await web.tcp(node)
    await t.register("phone")
    for text in ("one", "two", "three"):
        t.send({"message": text, "receiver": "browser"})
        await t.expect("accepted")
    w2 = await web.ws(node)
    reply = await w2.reconnect("browser", token)
    assert reply["pending"] == 3
    assert [(await w2.next())["message"] for _ in range(3)] == ["one", "two", "three"]


@ensure
async def test_takeover_from_websocket_to_tcp_and_back(web):
    node = await web.node()
    w = await web.ws(node)
    token = await w.register("dana")
    t = await web.tcp(node)
    await t.reconnect("dana", token)
    await w.error("session_replaced")
    assert await w.wait_closed() == (1000, "session_replaced")
    w2 = await web.ws(node)
    await w2.reconnect("dana", token)
    await t.error("session_replaced")
    await t.wait_closed()
    assert node.hub.sessions["dana"].conn in node.factory.connections


@ensure
async def test_wss(web, chatd, tmp_path):
    """--websocket ssl:…: the same over TLS, closing included (no half-close there)."""
    from twisted.internet import ssl
    from tests.helpers import make_certificate, ssl_port
    key_path, cert_path = make_certificate(str(tmp_path))
    node = await chatd(websocket=(ssl_port(key_path, cert_path),))
    with open(cert_path, "rb") as f:
        tls = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(f.read()))
    a = await web.ws(node, tls=tls)
    b = await web.ws(node, tls=tls)
    token = await a.register("alice")
    await b.register("bob")
    a.send({"message": "over wss", "receiver": "bob"})
    await a.expect("accepted")
    await b.expect("message", message="over wss")
    a2 = await web.ws(node, tls=tls)
    await a2.reconnect("alice", token)
    await a.error("session_replaced")
    assert await a.wait_closed() == (1000, "session_replaced")


# -- bad frames -------------------------------------------------------------------------

@ensure
async def test_binary_frame_is_refused_with_1003(web):
    node = await web.node()
    c = await web.ws(node)
    await c.register("binary")
    c.send_raw(frame(BINARY, b'{"ping":"x"}'))
    e = await c.error("bad_packet")
    assert "binary" in e["reason"]
    assert await c.wait_closed() == (1003, "bad_packet")
    assert "binary" not in node.hub.sessions


@ensure
async def test_invalid_utf8_is_closed_with_1007(web):
    node = await web.node()
    c = await web.ws(node)
    c.send_raw(frame(TEXT, b'{"ping":"\xff\xfe"}'))
    code, _ = await c.wait_closed()
    assert code == 1007
    assert not node.factory.connections


@ensure
async def test_frame_over_max_line_is_line_too_long_with_1009(web):
    node = await web.node(max_line=1024)
    c = await web.ws(node)
    c.send('{"ping":"%s"}' % ("x" * 1013))  # exactly 1024 bytes: fine
    await c.expect("pong")
    c.send('{"ping":"%s"}' % ("x" * 1014))
    await c.error("line_too_long")
    assert await c.wait_closed() == (1009, "line_too_long")


@ensure
async def test_an_endless_frame_is_cut_before_it_is_buffered_whole(web):
    """A frame that claims 1 GiB: chatd closes once it is past the limit,
    rather than reading (and keeping) it all."""
    node = await web.node(max_line=4096)
    c = await web.ws(node)
    c.send_raw(frame_header(TEXT, 1 << 30))
    sent = 0
    chunk = b"a" * 4096
    while c.close_code is None and c.proto.transport.connected:
        assert sent < 64 << 20, "64 MiB of one frame were taken in"
        c.send_raw(chunk)
        sent += len(chunk)
        await pass_time(0.001)
    assert await c.wait_closed() == (1009, "line_too_long")
    assert '"line_too_long"' in c.frames[-1]


@ensure
async def test_fragmented_message_is_one_packet(web):
    node = await web.node()
    c = await web.ws(node)
    packet = json.dumps({"register": "true", "sender": "frag"}).encode()
    c.send_raw(frame(TEXT, packet[:10], fin=False) + frame(PING, b"mid")
               + frame(0x0, packet[10:20], fin=False) + frame(0x0, packet[20:]))
    await c.expect("registered", sender="frag")


# -- flow control, takeover, liveness, shutdown -------------------------------------------

@ensure
async def test_slow_websocket_reader_is_cut_and_keeps_its_messages(web, redis):
    node = await web.node(output_limit=64 * 1024)
    a = await web.tcp(node)
    await a.register("alice")
    sleeper = socket.socket()
    sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sleeper.connect(("127.0.0.1", ws_port(node)))
    try:
        sleeper.sendall(handshake())
        sleeper.setblocking(False)
        response = await wait_until(lambda: _recv(sleeper))  # a client waits for it
        assert response.startswith(b"HTTP/1.1 101 ")
        sleeper.sendall(frame(TEXT, b'{"register":"true","sender":"sleeper"}'))
        await wait_until(lambda: "sleeper" in node.hub.sessions)
        n = await send_until_cut(a, node, "sleeper")
        assert redis.command("LLEN", "chatd:{sleeper}:inbox") == n  # nothing lost
        a.send({"ping": "ok"})
        await a.expect("pong")
    finally:
        sleeper.close()


def _recv(sock):
    try:
        return sock.recv(4096)
    except BlockingIOError:
        return None


@ensure
async def test_ping_frames_count_as_activity(web):
    """A client that only sends WebSocket pings is not idle; one that sends
    nothing is, after the server's own ping (a JSON line and a ping frame)."""
    node = await web.node(keepalive=0.5, idle_timeout=2.5)
    busy = await web.ws(node)
    await busy.register("busy")
    quiet = await web.ws(node)
    await quiet.register("quiet")
    quiet.proto.write_event = lambda event: None  # does not even answer pings
    for _ in range(30):  # 3 s: past the idle timeout
        busy.send_raw(frame(PING, b"still here"))
        await pass_time(0.1)
    assert busy.close_code is None and "busy" in node.hub.sessions
    await quiet.expect("ping")
    assert quiet.pings >= 1
    await quiet.error("idle_timeout")
    assert await quiet.wait_closed() == (1000, "idle_timeout")


@ensure
async def test_auth_timeout(web):
    node = await web.node(auth_timeout=0.5)
    c = await web.ws(node)
    await c.error("auth_timeout")
    assert await c.wait_closed() == (1000, "auth_timeout")


@ensure
async def test_rate_limit_over_websocket(web):
    node = await web.node(rate_limit=5.0, rate_burst=5)
    c = await web.ws(node)
    for i in range(8):
        c.send({"ping": i})
    # the burst goes through; the first packet over it is answered
    # rate_limited, the rest of the refill period is dropped in silence
    replies = [await c.next() for _ in range(6)]
    assert [r["type"] for r in replies[:5]] == ["pong"] * 5
    assert replies[5].get("code") == "rate_limited", replies[5]


@ensure
async def test_shutdown_closes_websockets_with_1001(web):
    node = await web.node()
    c = await web.ws(node)
    await c.register("leaving")
    await node.stop()
    await c.error("shutdown")
    assert await c.wait_closed() == (1001, "shutdown")


def test_the_websocket_option():
    from twisted.python import usage

    from chatd.app.tap import Options
    o = Options()
    o.parseOptions(["--websocket", "8080", "--websocket", "tcp:8081:interface=127.0.0.1"])
    assert o.settings.websocket == ("tcp:8080", "tcp:8081:interface=127.0.0.1")
    with pytest.raises(usage.UsageError, match="--websocket"):
        Options().parseOptions(["--websocket", "nope"])


# -- the page ---------------------------------------------------------------------------

@ensure
async def test_the_page_is_served_and_fetches_nothing_from_elsewhere(web):
    from twisted.internet import reactor
    from twisted.web.client import Agent, readBody
    node = await web.node()
    agent = Agent(reactor)
    base = "http://127.0.0.1:%d/" % ws_port(node)
    for path, kind, words in [("", "text/html", [b'src="chat.js"', b'href="chat.css"']),
                              ("chat.js", "javascript", [b"/ws"]),
                              ("chat.css", "text/css", [b"body"])]:
        response = await with_deadline(agent.request(b"GET", (base + path).encode()))
        body = await with_deadline(readBody(response))
        assert response.code == 200, path
        assert kind.encode() in response.headers.getRawHeaders(b"content-type")[0], path
        for word in words:
            assert word in body, (path, word)
        assert b"http://" not in body and b"https://" not in body, path
    response = await with_deadline(agent.request(b"GET", (base + "nope").encode()))
    await with_deadline(readBody(response))
    assert response.code == 404
    await with_deadline(agent._pool.closeCachedConnections(), DEADLINE, "close")
