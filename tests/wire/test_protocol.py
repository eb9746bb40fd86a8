"""
The wire protocol, line by line of the contract, through real sockets and
the real store.
"""

import json
import socket
import time

import pytest
import pytest_twisted

from chatd.hub import tokens
from tests.helpers import connect_sleeper, pair, pass_time, send_until_cut, wait_until

ensure = pytest_twisted.ensureDeferred


def read_to_end(s):
    """Everything a blocking socket reads until the server's FIN (bytes),
    or a description of the reset that ended it (str)."""
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
    except OSError as e:
        return "reset (%r) after %d bytes ending %r" % (e, len(data), data[-200:])


# -- register / reconnect -----------------------------------------------------------

@ensure
async def test_register_reply_and_token(chatd, clients, redis):
    node = await chatd()
    c = await clients(node)
    c.send({"register": "true", "sender": "0011001100"})
    msg = await c.expect("registered", sender="0011001100")
    assert set(msg) == {"type", "sender", "token"}
    token = msg["token"]
    assert len(token) >= 22 and all(ch.isalnum() or ch in "-_" for ch in token)
    # only a hash is stored, never the token itself
    assert redis.command("GET", "chatd:{0011001100}:token") == tokens.token_hash(token).encode()
    for key in redis.command("KEYS", "*"):
        assert token.encode() not in key
        if redis.command("TYPE", key) == b"string":
            assert token.encode() not in redis.command("GET", key)


@ensure
async def test_seed_literal_packets_and_line_endings(chatd, clients):
    node = await chatd()
    c = await clients(node)
    c.send(b"\r\n\n   \n{'register':'true', 'sender':'0011001100'}\r\n")
    token = (await c.expect("registered", sender="0011001100"))["token"]
    d = await clients(node)
    await d.register("987654321")
    c.send(("{'message':'Kya Bhai?', 'sender':'0011001100', 'receiver':'987654321', "
            "'token':'%s'}\r\n" % token).encode())
    await c.expect("accepted", receiver="987654321")
    push = await d.expect("message", sender="0011001100", message="Kya Bhai?")
    assert isinstance(push["sent_at"], int)
    e = await clients(node)
    e.send("{'reconnect':'true', 'token':'%s', 'sender':'0011001100'}" % token)
    await e.expect("reconnected", sender="0011001100", pending=0)


@pytest.mark.parametrize("flag", ["true", True, "True", "t"])
@ensure
async def test_flag_forms(chatd, clients, flag):
    node = await chatd()
    c = await clients(node)
    c.send({"register": flag, "sender": "x1"})
    await c.expect("registered", sender="x1")


@ensure
async def test_reconnect_token_rules(chatd, clients):
    node = await chatd()
    c = await clients(node)
    old = await c.register("bob")
    await c.close()
    c2 = await clients(node)
    await c2.reconnect("bob", old)
    new = await c2.register("bob")   # register again: the old token is revoked
    assert new != old
    c3 = await clients(node)
    c3.send({"reconnect": "true", "sender": "bob", "token": old})
    await c3.error("bad_token")
    # the connection stays unbound and usable: it may register again
    c3.send({"ack": "1"})
    await c3.error("not_registered")
    c3.send({"reconnect": "true", "sender": "nobody", "token": new})
    await c3.error("bad_token")
    await c3.reconnect("bob", new)


@ensure
async def test_takeover_closes_older_connection(chatd, clients):
    node, a, b = await pair(chatd, clients)
    b2 = await clients(node)
    await b2.register("bob")
    await b.error("session_replaced")
    await b.wait_closed()
    a.send({"message": "to the new one", "receiver": "bob"})
    await a.expect("accepted")
    await b2.expect("message", message="to the new one")


@ensure
async def test_reconnect_takes_over_too(chatd, clients):
    node, a, b = await pair(chatd, clients)
    b2 = await clients(node)
    await b2.reconnect("bob", b.token)
    await b.error("session_replaced")
    await b.wait_closed()


@ensure
async def test_one_connection_one_id(chatd, clients):
    node, a, b = await pair(chatd, clients)
    a.send({"register": "true", "sender": "carol"})
    await a.error("forbidden")
    # registering the same id again on the same connection just renews the token
    a.send({"register": "true", "sender": "alice"})
    token = (await a.expect("registered", sender="alice"))["token"]
    a.send({"message": "still here", "receiver": "bob", "token": token})
    await a.expect("accepted")


# -- messages ------------------------------------------------------------------------

@ensure
async def test_message_replies_and_push(chatd, clients):
    node, a, b = await pair(chatd, clients)
    a.send({"message": "Kya Bhai?", "receiver": "bob", "ref": "c-17"})
    acc = await a.expect("accepted", receiver="bob", ref="c-17")
    assert set(acc) == {"type", "id", "receiver", "ref"}
    push = await b.expect("message")
    assert set(push) == {"type", "id", "sender", "receiver", "message", "sent_at"}
    assert push == dict(push, id=acc["id"], sender="alice", receiver="bob", message="Kya Bhai?")
    assert abs(push["sent_at"] - time.time() * 1000) < 60000
    a.send({"message": "no ref", "receiver": "bob"})
    assert (await a.expect("accepted"))["ref"] is None
    a.send({"message": "with sender", "receiver": "bob", "sender": "alice", "token": a.token,
            "extra": {"ignored": [1, 2]}})
    await a.expect("accepted")


@ensure
async def test_sender_and_token_rules(chatd, clients):
    node, a, b = await pair(chatd, clients)
    a.send({"message": "x", "receiver": "bob", "sender": "bob", "ref": 7})
    e = await a.error("forbidden")
    assert e["ref"] == 7
    a.send({"message": "x", "receiver": "bob", "token": b.token})
    await a.error("bad_token")
    a.send({"message": "x", "receiver": "nobody"})
    e = await a.error("unknown_receiver")
    assert "nobody" in e["reason"]


@ensure
async def test_one_shot_send_on_unbound_connection(chatd, clients):
    node, a, b = await pair(chatd, clients)
    c = await clients(node)
    c.send({"message": "one shot", "receiver": "bob"})
    await c.error("not_registered")
    c.send({"message": "one shot", "receiver": "bob", "sender": "alice"})
    await c.error("not_registered")
    c.send({"message": "one shot", "receiver": "bob", "sender": "alice", "token": "wrong"})
    await c.error("bad_token")
    c.send({"message": "one shot", "receiver": "bob", "sender": "alice", "token": a.token})
    await c.expect("accepted", receiver="bob")
    await b.expect("message", sender="alice", message="one shot")
    # the connection did not become alice's
    c.send({"ack": "1"})
    await c.error("not_registered")
    assert await a.sync() == []


@ensure
async def test_message_too_long_counts_utf8_bytes(chatd, clients):
    node, a, b = await pair(chatd, clients, max_message=10)
    a.send({"message": "é" * 5, "receiver": "bob"})   # 10 bytes
    await a.expect("accepted")
    a.send({"message": "é" * 6, "receiver": "bob", "ref": "long"})  # 12 bytes
    e = await a.error("message_too_long")
    assert e["ref"] == "long"


@ensure
async def test_inbox_full_drops_nothing(chatd, clients, redis):
    node, a, b = await pair(chatd, clients, inbox_limit=3)
    await b.close()
    for i in range(3):
        a.send({"message": "m%d" % i, "receiver": "bob"})
        await a.expect("accepted")
    a.send({"message": "m3", "receiver": "bob"})
    await a.error("inbox_full")
    assert redis.command("LLEN", "chatd:{bob}:inbox") == 3
    b2 = await clients(node)
    await b2.reconnect("bob", b.token)
    got = [await b2.expect("message") for _ in range(3)]
    assert [m["message"] for m in got] == ["m0", "m1", "m2"]
    # the refused text was not stored, so it is no duplicate once there is room
    b2.send({"ack": got[-1]["id"]})
    await wait_until(lambda: redis.command("LLEN", "chatd:{bob}:inbox") == 0,
                     what="the ack to empty the inbox")
    a.send({"message": "m3", "receiver": "bob"})
    await a.expect("accepted")
    assert (await b2.expect("message"))["message"] == "m3"


# -- duplicates and refs --------------------------------------------------------------

@ensure
async def test_dedup_window_anchored_on_accepted_copy(chatd, clients):
    """window 3 s: accepted at 0, duplicate at ~1.5 even from another sender,
    accepted again just past 3 (the suppressed copy at 1.5 did not extend
    the window: had it, the window would last until ~4.5).

    Times are anchored on the ``accepted`` reply (the window started before
    it), and each step has about 1.5 s of slack, so only a stall that long
    makes it fail on a correct server."""
    window = 3.0
    node, a, b = await pair(chatd, clients, dedup_window=window)
    c = await clients(node)
    await c.register("carol")
    a.send({"message": "same text", "receiver": "bob"})
    await a.expect("accepted")
    accepted = time.monotonic()  # the window started before this
    a.send({"message": "same text", "receiver": "bob"})
    await a.expect("duplicate", receiver="bob", ref=None)
    await wait_until(lambda: time.monotonic() - accepted >= window / 2)
    c.send({"message": "same text", "receiver": "bob", "ref": "c1"})
    dup = await c.expect("duplicate", receiver="bob", ref="c1")
    assert set(dup) == {"type", "receiver", "ref"}
    # same text to another receiver is not a duplicate
    a.send({"message": "same text", "receiver": "carol"})
    await a.expect("accepted")
    await c.expect("message", receiver="carol")
    await wait_until(lambda: time.monotonic() - accepted >= window + 0.05)
    c.send({"message": "same text", "receiver": "bob"})
    await c.expect("accepted")
    pushes = [m for m in await b.sync() if m["type"] == "message"]
    assert [p["message"] for p in pushes] == ["same text", "same text"]


@ensure
async def test_ref_retry_gets_first_reply_and_stores_nothing(chatd, clients, redis):
    node, a, b = await pair(chatd, clients)
    a.send({"message": "hello", "receiver": "bob", "ref": "r-1"})
    first = await a.expect("accepted", ref="r-1")
    await b.expect("message", id=first["id"])
    # the phone lost the reply and retries, even on another connection
    a2 = await clients(node)
    a2.send({"message": "hello", "receiver": "bob", "ref": "r-1", "sender": "alice",
             "token": a.token})
    again = await a2.expect("accepted", ref="r-1")
    assert again == first
    # a retry wins over the duplicate rule, and the ref wins over the text
    a.send({"message": "different text", "receiver": "bob", "ref": "r-1"})
    assert await a.expect("accepted") == first
    assert redis.command("LLEN", "chatd:{bob}:inbox") == 1
    assert await b.sync() == []  # not pushed again
    # the ref of a duplicate answers duplicate again
    a.send({"message": "hello", "receiver": "bob", "ref": "r-2"})
    await a.expect("duplicate", ref="r-2")
    a.send({"message": "hello", "receiver": "bob", "ref": "r-2"})
    await a.expect("duplicate", ref="r-2")
    # refs belong to the sender: the same ref from someone else is a new send
    b.send({"message": "reply", "receiver": "alice", "ref": "r-1"})
    await b.expect("accepted", ref="r-1")


@ensure
async def test_integer_ref_is_echoed_as_integer(chatd, clients):
    node, a, b = await pair(chatd, clients)
    a.send({"message": "n", "receiver": "bob", "ref": 42})
    await a.expect("accepted", ref=42)
    a.send({"message": "n2", "receiver": "bob", "ref": "42"})
    await a.expect("accepted", ref="42")  # "42" and 42 are different refs


# -- delivery --------------------------------------------------------------------------

@ensure
async def test_offline_messages_in_order_with_pending(chatd, clients):
    node, a, b = await pair(chatd, clients)
    c = await clients(node)
    await c.register("carol")
    await b.close()
    sent = []
    for i in range(6):
        src = a if i % 2 else c
        src.send({"message": "m%d" % i, "receiver": "bob"})
        sent.append((await src.expect("accepted"))["id"])
    assert sent == sorted(sent) and len(set(sent)) == 6
    b2 = await clients(node)
    b2.send({"reconnect": "true", "sender": "bob", "token": b.token})
    # the reply comes before any push
    await b2.expect("reconnected", pending=6)
    pushes = [await b2.expect("message") for _ in range(6)]
    assert [p["message"] for p in pushes] == ["m%d" % i for i in range(6)]
    assert [p["id"] for p in pushes] == sent
    assert [p["sender"] for p in pushes] == ["carol", "alice"] * 3


@ensure
async def test_waiting_messages_go_out_before_newer_ones(chatd, clients):
    node, a, b = await pair(chatd, clients, drain_batch=50)
    await b.close()
    for i in range(180):
        a.send({"message": "old %d" % i, "receiver": "bob"})
    for i in range(180):
        await a.expect("accepted")
    b2 = await clients(node)
    b2.send({"reconnect": "true", "sender": "bob", "token": b.token})
    await b2.expect("reconnected", pending=180)
    for i in range(40):  # new messages race with the drain
        a.send({"message": "new %d" % i, "receiver": "bob"})
    got = [(await b2.expect("message"))["message"] for _ in range(220)]
    assert got == ["old %d" % i for i in range(180)] + ["new %d" % i for i in range(40)]
    assert await b2.sync() == []


@ensure
async def test_ack_is_cumulative_and_unacked_come_again(chatd, clients, redis):
    node, a, b = await pair(chatd, clients)
    ids = []
    for i in range(4):
        a.send({"message": "m%d" % i, "receiver": "bob"})
        ids.append((await a.expect("accepted"))["id"])
    pushes = [await b.expect("message") for _ in range(4)]
    assert [p["id"] for p in pushes] == ids
    b.send({"ack": ids[1]})  # covers m0 and m1
    await wait_until(lambda: redis.command("LLEN", "chatd:{bob}:inbox") == 2)
    await b.close()
    b2 = await clients(node)
    await b2.reconnect("bob", b.token)  # pending counts pushed-but-unacked ones
    again = [await b2.expect("message") for _ in range(2)]
    assert [p["id"] for p in again] == ids[2:]
    assert again == pushes[2:]  # same ids, same sent_at, same bytes
    assert await b2.sync() == []  # never twice on one connection
    b2.send({"ack": int(ids[3])})  # an id given as a number is understood too
    await wait_until(lambda: redis.command("LLEN", "chatd:{bob}:inbox") == 0)


@ensure
async def test_bad_ack(chatd, clients):
    node, a, b = await pair(chatd, clients)
    a.send({"message": "m", "receiver": "bob"})
    await a.expect("accepted")
    await b.expect("message")
    b.send({"ack": "0000000000000099"})
    e = await b.error("bad_ack")
    assert e["ref"] is None
    b.send({"ack": "not an id"})
    await b.error("bad_ack")
    b.send({"ack": ["x"]})
    e = await b.error("bad_field")
    assert "ack" in e["reason"]
    a.send({"ack": "0000000000000001"})  # alice was pushed nothing
    await a.error("bad_ack")


@ensure
async def test_ids_keep_increasing_after_inbox_empties_and_restart(chatd, clients, redis):
    node, a, b = await pair(chatd, clients)
    a.send({"message": "one", "receiver": "bob"})
    first = (await b.expect("message"))["id"]
    b.send({"ack": first})
    await wait_until(lambda: redis.command("EXISTS", "chatd:{bob}:inbox") == 0)
    await node.stop()
    node2 = await chatd()
    a2 = await clients(node2)
    await a2.reconnect("alice", a.token)
    a2.send({"message": "two", "receiver": "bob"})
    second = (await a2.expect("accepted"))["id"]
    assert second > first and int(second) > int(first)


@ensure
async def test_pipelined_register_and_message(chatd, clients):
    """A client may write register and its first message without waiting."""
    node = await chatd()
    b = await clients(node)
    await b.register("bob")
    a = await clients(node)
    a.send(b'{"register":"true","sender":"alice"}\n{"message":"fast","receiver":"bob"}\n')
    await a.expect("registered")
    await a.expect("accepted")
    await b.expect("message", message="fast")


# -- bad input -------------------------------------------------------------------------

@pytest.mark.parametrize("line, code, field", [
    (b"hello", "bad_packet", None),
    (b"[1, 2]", "bad_packet", None),
    (b'"just a string"', "bad_packet", None),
    (b'{"register": "true", "sender": "a"', "bad_packet", None),
    (b"\xff\xfe{}", "bad_packet", None),
    (b"{" * 20000, "bad_packet", None),
    (b"[" * 20000 + b"]" * 20000, "bad_packet", None),
    (b"{'register': 'true', 'sender': __import__('os')}", "bad_packet", None),
    (b"{}", "unknown_packet", None),
    (b'{"hello": 1}', "unknown_packet", None),
    (b'{"register": "true", "ping": "x", "sender": "a"}', "unknown_packet", None),
    (b'{"register": "true"}', "missing_field", "sender"),
    (b'{"register": "false", "sender": "a"}', "bad_field", "register"),
    (b'{"register": "true", "sender": "bad id!"}', "bad_field", "sender"),
    (b'{"register": "true", "sender": "' + b"x" * 65 + b'"}', "bad_field", "sender"),
    (b'{"register": "true", "sender": 11001100}', "bad_field", "sender"),
    (b'{"reconnect": "true", "sender": "a"}', "missing_field", "token"),
    (b'{"reconnect": "true", "sender": "a", "token": 5}', "bad_field", "token"),
    (b'{"message": "x"}', "missing_field", "receiver"),
    (b'{"message": 5, "receiver": "b"}', "bad_field", "message"),
    (b'{"message": "x", "receiver": "b", "ref": ["r"]}', "bad_field", "ref"),
    (b'{"ack": null}', "bad_field", "ack"),
])
@ensure
async def test_bad_input_gets_the_right_error_and_connection_stays(chatd, clients, line, code, field):
    node = await chatd()
    c = await clients(node)
    c.send(line + b"\n")
    e = await c.error(code)
    assert set(e) >= {"type", "code", "reason", "ref"}
    assert e.get("field") == field, e
    await c.register("still-works")


@ensure
async def test_error_echoes_ref(chatd, clients):
    node = await chatd()
    c = await clients(node)
    c.send({"message": "x", "ref": "abc"})
    e = await c.error("missing_field")
    assert e["ref"] == "abc"
    c.send({"bogus": 1, "ref": "q"})
    assert (await c.error("unknown_packet"))["ref"] == "q"


@ensure
async def test_line_too_long_closes(chatd, clients):
    node = await chatd(max_line=1024)
    c = await clients(node)
    c.send(b'{"ping":"' + b"x" * 1000 + b'"}\r\n')  # 1011 bytes + CR: fine
    await c.expect("pong")
    c.send(b"x" * 1025 + b"\n")
    await c.error("line_too_long")
    await c.wait_closed()
    d = await clients(node)
    d.send(b"y" * 5000)  # no newline at all
    await d.error("line_too_long")
    await d.wait_closed()


@ensure
async def test_server_lines_are_compact_json_objects(chatd, clients):
    node, a, b = await pair(chatd, clients)
    a.send({"ping": "ünï"})
    await a.expect("pong", ping="ünï")
    a.send({"message": "x", "receiver": "nobody"})
    await a.error("unknown_receiver")
    for raw in a.raw + b.raw:
        assert not raw.endswith((b" ", b"\r"))
        assert isinstance(json.loads(raw), dict) and "type" in json.loads(raw)


# -- liveness and limits ---------------------------------------------------------------

@ensure
async def test_ping_pong_and_auth_timeout(chatd, clients):
    node = await chatd(auth_timeout=0.5)
    c = await clients(node)
    c.send({"ping": {"any": ["value"]}})
    await c.expect("pong", ping={"any": ["value"]})
    await c.error("auth_timeout", timeout=5)   # a ping does not satisfy it
    await c.wait_closed()
    d = await clients(node)
    await d.register("in-time")
    assert await d.sync() == []


@ensure
async def test_keepalive_ping_then_idle_timeout(chatd, clients):
    node = await chatd(keepalive=0.3, idle_timeout=1.0)
    c = await clients(node)
    await c.register("sleepy")
    await c.expect("ping", timeout=3)
    c.send({"ping": "awake"})  # any packet answers
    await c.expect("pong")
    await c.expect("ping", timeout=3)
    e = await c.error("idle_timeout", timeout=3)
    assert "1" in e["reason"]
    await c.wait_closed()


@ensure
async def test_idle_timeout_alone_pings_before_it_closes(chatd, clients):
    """`--idle-timeout 2s` alone (the default keepalive is 60 s): the node
    starts, pings a silent client at half of it, and closes it at 2 s."""
    from chatd.app.tap import Options
    o = Options()
    o.parseOptions(["--idle-timeout", "2s"])
    node = await chatd(keepalive=o.settings.keepalive, idle_timeout=o.settings.idle_timeout)
    c = await clients(node)
    await c.register("sleepy")
    await c.expect("ping", timeout=10)
    e = await c.error("idle_timeout", timeout=10)
    assert "2s" in e["reason"]
    await c.wait_closed()


@ensure
async def test_rate_limit(chatd, clients):
    node = await chatd(rate_limit=5.0, rate_burst=5)
    c = await clients(node)
    for i in range(8):
        c.send({"ping": i, "ref": "p%d" % i})
    replies = [await c.next() for _ in range(6)]
    assert [r["type"] for r in replies[:5]] == ["pong"] * 5
    # one rate_limited for the first packet dropped; the others are dropped
    # in silence (see test_security: a reply per drop was an amplifier)
    assert replies[5]["code"] == "rate_limited" and replies[5]["ref"] == "p5"
    # the bucket refills at the rate
    await pass_time(0.25)
    c.send({"ping": "again"})
    await c.expect("pong", ping="again")


@ensure
async def test_tcp_nodelay_is_set(chatd, clients):
    node = await chatd()
    c = await clients(node)
    await c.register("fast")
    [conn] = list(node.factory.connections)
    sock = conn.transport.getHandle()
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@ensure
async def test_slow_consumer_is_cut_and_keeps_its_messages(chatd, clients, redis):
    node = await chatd(output_limit=64 * 1024)
    a = await clients(node)
    await a.register("alice")
    sleeper = await connect_sleeper(node, "sleeper")
    try:
        n = await send_until_cut(a, node, "sleeper")
        stored = redis.command("LLEN", "chatd:{sleeper}:inbox")
        assert stored == n  # nothing acked, nothing lost
        # the other client was not held up
        a.send({"ping": "ok"})
        await a.expect("pong")
    finally:
        sleeper.close()


@ensure
async def test_shutdown_tells_clients_when_to_come_back(chatd, clients):
    """``shutdown`` carries ``retry_after_ms`` (1.2 extension): when to come
    back, spread over a window, so a restart makes no storm of its own."""
    from chatd.wire.factory import RETRY_AFTER_MS, RETRY_WINDOW_MIN_MS
    node, a, b = await pair(chatd, clients)
    await node.stop()
    for c in (a, b):
        err = await c.error("shutdown")
        after = err["retry_after_ms"]
        assert isinstance(after, int)
        assert RETRY_AFTER_MS <= after < RETRY_AFTER_MS + RETRY_WINDOW_MIN_MS
    await a.wait_closed()
    await b.wait_closed()


def test_retry_after_spreads_with_the_connections():
    """The window grows with the connections told, within its bounds."""
    import random

    from chatd.wire import factory
    rng = random.Random(7)
    few = [factory.retry_after_ms(3, rng) for _ in range(2000)]
    many = [factory.retry_after_ms(80000, rng) for _ in range(2000)]
    assert min(few) >= factory.RETRY_AFTER_MS and max(few) < factory.RETRY_AFTER_MS + 5000
    assert max(many) < factory.RETRY_AFTER_MS + factory.RETRY_WINDOW_MAX_MS
    assert max(many) > factory.RETRY_AFTER_MS + 20000  # spread over most of 30 s


# -- proof mode -------------------------------------------------------------------------

@ensure
async def test_registration_proof(chatd, clients):
    secret = b"s3cret"
    node = await chatd(registration="proof", registration_secret=secret)
    c = await clients(node)
    c.send({"register": "true", "sender": "0011001100"})
    await c.error("forbidden")
    now = int(time.time())
    c.send({"register": "true", "sender": "0011001100",
            "proof": tokens.make_proof(secret, "0011001100", now - 1)})
    await c.error("forbidden")  # expired
    c.send({"register": "true", "sender": "0011001100",
            "proof": tokens.make_proof(secret, "0022002200", now + 60)})
    await c.error("forbidden")  # someone else's ticket
    proof = tokens.make_proof(secret, "0011001100", now + 60)
    c.send({"register": "true", "sender": "0011001100", "proof": proof.upper()})
    await c.error("forbidden")  # the contract says lowercase hex
    c.send({"register": "true", "sender": "0011001100", "proof": tokens.make_proof(
        b"other", "0011001100", now + 60)})
    await c.error("forbidden")
    c.send({"register": "true", "sender": "0011001100", "proof": proof})
    token = (await c.expect("registered"))["token"]
    # reconnect needs no proof, only the token
    d = await clients(node)
    await d.reconnect("0011001100", token)


def test_proof_format_matches_contract():
    import hashlib
    import hmac
    mac = hmac.new(b"k", b"0011001100:1700000000", hashlib.sha256).hexdigest()
    assert tokens.make_proof(b"k", "0011001100", 1700000000) == "1700000000:" + mac
    assert tokens.check_proof(b"k", "0011001100", "1700000000:" + mac, 1699999999)
    assert not tokens.check_proof(b"k", "0011001100", "1700000000:" + mac, 1700000000)
    assert not tokens.check_proof(b"k", "0011001100", "garbage", 0)
    assert not tokens.check_proof(b"k", "0011001100", "1700000000:" + "é" * 64, 0)


# -- the store going away ----------------------------------------------------------------

@pytest.mark.slow
@ensure
async def test_unavailable_while_store_down_then_recovers(chatd, clients, own_redis):
    node = await chatd(target=own_redis.target, redis_timeout=0.5)
    a = await clients(node)
    b = await clients(node)
    await a.register("alice")
    await b.register("bob")
    own_redis.stop()
    a.send({"message": "while down", "receiver": "bob", "ref": "d1"})
    e = await a.error("unavailable", timeout=5)
    assert e["ref"] == "d1"
    c = await clients(node)
    c.send({"register": "true", "sender": "carol"})
    await c.error("unavailable", timeout=5)
    c.send({"ping": "still answering"})
    await c.expect("pong")
    own_redis.start().wait_ready()
    # chatd reconnects by itself; the connections were kept
    assert await node.service.client.when_connected(10), "chatd did not reconnect"
    a.send({"message": "back", "receiver": "bob", "ref": "d2"})
    await a.expect("accepted", ref="d2")
    await b.expect("message", message="back")
    # nothing of the failed send was stored
    assert own_redis.command("LLEN", "chatd:{bob}:inbox") == 1


@pytest.mark.slow
@ensure
async def test_inbox_ttl_expires_undelivered_messages(chatd, clients, redis):
    node, a, b = await pair(chatd, clients, inbox_ttl=1.0, inbox_limit=2)
    await b.close()
    a.send({"message": "old 1", "receiver": "bob"})
    a.send({"message": "old 2", "receiver": "bob"})
    await a.expect("accepted")
    await a.expect("accepted")
    a.send({"message": "no room", "receiver": "bob"})
    await a.error("inbox_full")
    await pass_time(1.2)
    # expired messages make room, and are never pushed
    a.send({"message": "new", "receiver": "bob"})
    new_id = (await a.expect("accepted"))["id"]
    b2 = await clients(node)
    assert (await b2.reconnect("bob", b.token))["pending"] == 1
    push = await b2.expect("message", message="new")
    assert push["id"] == new_id
    assert await b2.sync() == []


@ensure
async def test_a_client_done_sending_still_gets_its_answers(chatd, clients):
    """``printf '...' | nc -N host port``: the client shuts its sending side
    after its packets; chatd answers them all, then closes."""
    from twisted.internet import threads
    node, a, b = await pair(chatd, clients)

    def one_shot():
        s = socket.create_connection(("127.0.0.1", node.port), timeout=10)
        s.sendall(b'{"register":"true","sender":"carol"}\n'
                  b'{"message":"from a script","receiver":"bob"}\n{"ping":"last"}\n')
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
        return [json.loads(line)["type"] for line in data.splitlines()]

    # (a pong does not wait for the store: it may overtake the accepted)
    replies = await threads.deferToThread(one_shot)
    assert replies[0] == "registered" and sorted(replies[1:]) == ["accepted", "pong"]
    await b.expect("message", message="from a script")


@ensure
async def test_a_client_streaming_an_endless_line_gets_line_too_long(chatd, clients):
    """A client that streams an endless line (and reads all the while) gets
    line_too_long before the connection ends, every time. (Whether the close
    loses the error to a reset is the next test's question.)"""
    import threading
    from twisted.internet import threads
    node = await chatd(max_line=1024)

    def stream():
        s = socket.create_connection(("127.0.0.1", node.port), timeout=10)

        def send():
            try:
                for _ in range(64):  # well past the line limit
                    s.sendall(b"x" * 4096)
            except OSError:
                pass

        sender = threading.Thread(target=send)
        sender.start()
        data = read_to_end(s)
        sender.join()
        s.close()
        return data

    for _ in range(3):
        data = await threads.deferToThread(stream)
        assert isinstance(data, bytes), data
        assert json.loads(data.splitlines()[0])["code"] == "line_too_long"


@ensure
async def test_the_closing_error_survives_input_that_arrives_after_it(chatd, clients):
    """The closing error must reach a client that is behind on reading and
    still sending when chatd closes on it. Closing a socket with unread
    input makes the kernel reset the connection and drop whatever it had not
    yet delivered, the error line with it; chatd therefore shuts only its
    sending side and reads (and drops) what still comes.

    Here the client does not read at first (a small receive buffer: chatd's
    answers to 30 pings wait in chatd's kernel queue), sends a line over the
    limit, and then, as a phone would, a little more. Only then does it
    read: it must get every pong, then line_too_long, then the end."""
    import threading
    from twisted.internet import threads
    node = await chatd(max_line=1024)
    pings = 30

    def behind():
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(("127.0.0.1", node.port))
        s.sendall(b"".join(b'{"ping":"%d %s"}\n' % (i, b"p" * 900) for i in range(pings)))
        s.sendall(b"y" * 1100 + b"\n")  # over the limit: chatd closes
        stop = threading.Event()
        for _ in range(8):  # input after the close (less than a line's worth)
            if stop.wait(0.03):
                break
            try:
                s.sendall(b"z" * 100)
            except OSError:
                break
        data = read_to_end(s)
        s.close()
        return data

    data = await threads.deferToThread(behind)
    assert isinstance(data, bytes), data
    assert data.endswith(b"\n"), "cut short after %d bytes: ...%r" % (len(data), data[-100:])
    lines = [json.loads(line) for line in data.splitlines()]
    assert [m["type"] for m in lines] == ["pong"] * pings + ["error"], lines[-2:]
    assert lines[-1]["code"] == "line_too_long"
