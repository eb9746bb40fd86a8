"""
What a client's bytes cost the server (issue 23, items 3, 4 and 5), over
real sockets: the rate limit charges by bytes as well as lines, and before
the line is read; a message costs the store at most about twice
``--max-message``; errors and echoes cannot be bought at a fraction of
their size, over and over.

No timing here: CPU per byte is measured by ``benchmarks/parse_cost.py``.
"""

import json

import pytest_twisted

from chatd.wire import packets, ratelimit
from tests.helpers import pass_time

ensure = pytest_twisted.ensureDeferred


async def _replies_until_pong(c, marker):
    c.send({"ping": marker})
    out = []
    while True:
        msg = await c.next()
        if msg.get("type") == "pong" and msg.get("ping") == marker:
            return out
        out.append(msg)


# -- item 3: by bytes, before reading ---------------------------------------------

@ensure
async def test_big_lines_cost_by_their_bytes_not_by_the_line(chatd, clients):
    """Three 40 KB lines within a burst of three lines: the third is over the
    allowance (two tokens each), where lines alone let all three through."""
    node = await chatd(rate_limit=1.0, rate_burst=3)
    c = await clients(node)
    for i in range(3):
        c.send({"ping": i, "pad": "x" * 40000, "ref": "big%d" % i})
    await c.expect("pong")
    await c.expect("pong")
    err = await c.error("rate_limited")
    assert err["ref"] == "big2"  # read for its ref, once: the notice
    assert "32 KiB" in err["reason"]


@ensure
async def test_messages_of_the_largest_size_cost_one_packet(chatd, clients):
    """A register and ten messages of --max-message bytes in a burst of
    eleven: all accepted (a client is not rate limited for the size of its
    messages)."""
    node = await chatd(rate_limit=1.0, rate_burst=11)
    a, b = await clients(node), await clients(node)
    await b.register("bob")
    await a.register("alice")
    for i in range(10):
        a.send({"message": "%d" % i + "m" * (16384 - 2), "receiver": "bob"})
    for i in range(10):
        await a.expect("accepted")


@ensure
async def test_ordinary_lines_still_cost_one_packet(chatd, clients):
    """Ten lines of 1000 bytes in a burst of ten all pass; the eleventh not."""
    node = await chatd(rate_limit=5.0, rate_burst=10)
    c = await clients(node)
    for i in range(11):
        c.send({"ping": i, "pad": "y" * 960, "ref": i})
    for i in range(10):
        await c.expect("pong", ping=i)
    await c.error("rate_limited")


@ensure
async def test_a_flood_of_big_literal_lines_is_closed_unread(chatd, clients):
    """Big dict-literal lines past the allowance are dropped before they
    are read, and the flood is closed like any other."""
    node = await chatd(rate_limit=1.0, rate_burst=1)
    c = await clients(node)
    line = b"{'ping':[" + b",".join([b"1"] * 30000) + b"]}\n"
    c.send(line * 20)
    await c.expect("pong")  # the first one, paid by going into debt
    first = await c.error("rate_limited")
    last = await c.error("rate_limited")
    assert "closing" in last["reason"] and "closing" not in first["reason"]
    await c.wait_closed()


@ensure
async def test_a_big_ack_is_not_free(chatd, clients):
    """An ack of something pushed is free, but only a short one: a big line
    that carries an ack costs its bytes (it was read first, for free)."""
    node = await chatd(rate_limit=1.0, rate_burst=2)
    a, b = await clients(node), await clients(node)
    await a.register("alice")
    await b.register("bob")
    a.send({"message": "m0", "receiver": "bob"})
    await a.expect("accepted")
    ids = [(await b.expect("message"))["id"]]
    b.send({"ack": ids[0], "junk": "z" * 60000})  # 2 tokens: into debt
    b.send({"ping": "after", "ref": "p"})
    err = await b.error("rate_limited")
    assert err["ref"] == "p"


# -- item 4: what a message costs the store ----------------------------------------

@ensure
async def test_control_characters_count_as_stored(chatd, clients, redis):
    """1000 control characters are 1000 bytes of UTF-8 but 6000 as stored:
    over twice a --max-message of 1200. A third of that is accepted, and
    its stored entry is within twice the limit plus the envelope."""
    node = await chatd(max_message=1200)
    a, b = await clients(node), await clients(node)
    await a.register("alice")
    await b.register("bob")
    a.send({"message": "\x01" * 1000, "receiver": "bob", "ref": "ctl"})
    e = await a.error("message_too_long")
    assert e["ref"] == "ctl" and "stored" in e["reason"] and "2400" in e["reason"]
    a.send({"message": "\x01" * 399, "receiver": "bob", "ref": "ok"})
    await a.expect("accepted", ref="ok")
    a.send({"message": '"' * 1200, "receiver": "bob", "ref": "quotes"})
    await a.expect("accepted", ref="quotes")
    entries = redis.command("LRANGE", "chatd:{bob}:inbox", 0, -1)
    assert entries and all(len(e) <= 2 * 1200 + 200 for e in entries), \
        [len(e) for e in entries]


def test_stored_size_is_the_json_size():
    from chatd.store.layout import push_tail
    for text in ["plain", "\x00\x1f\x7f", '"\\\n\t\b\f\r', "é中😀\u2028", "\x01" * 50]:
        raw = text.encode("utf-8")
        tail = push_tail("a", "b", text)
        assert packets.stored_size(raw) == len(tail) - len(push_tail("a", "b", ""))


# -- item 5: errors and echoes ------------------------------------------------------

@ensure
async def test_junk_lines_get_a_bounded_amount_of_errors(chatd, clients):
    """100 one-byte junk lines got 100 errors (11.8 KB, 59x); now errors
    stop at ERROR_BYTES a refill period, with one notice; the connection
    stays and its next packet is answered."""
    node = await chatd(rate_limit=50.0, rate_burst=100)  # the default allowance
    c = await clients(node)
    c.send(b"x\n" * 90)  # and the ping below: within the burst
    got = await _replies_until_pong(c, "still here")
    assert all(r["code"] == "bad_packet" for r in got)
    size = sum(len(packets.reply(r)) for r in got)
    assert size <= ratelimit.ERROR_BYTES + 300, size
    assert 5 < len(got) < 30, len(got)
    assert "too many errors" in got[-1]["reason"]


@ensure
async def test_a_client_that_keeps_sending_junk_is_closed(chatd, clients):
    """Over the errors' allowance again in the period after the notice:
    closed with rate_limited."""
    node = await chatd(rate_limit=100.0, rate_burst=100)  # periods of 1 s
    c = await clients(node)
    c.send(b"x\n" * 40)
    got = await _replies_until_pong(c, "one")
    assert "too many errors" in got[-1]["reason"]
    await pass_time(1.1)
    c.send(b"x\n" * 40)
    while True:
        msg = await c.next()
        if msg["code"] == "rate_limited":
            break
        assert msg["code"] == "bad_packet"
    assert "bad packets" in msg["reason"]
    await c.wait_closed()


@ensure
async def test_errors_about_a_packet_are_always_answered(chatd, clients):
    """Only junk (bad_packet) has an allowance of error bytes: a packet that
    is a JSON object gets its error, however many come (the contract: every
    packet is answered), within the rate limit."""
    node = await chatd(rate_limit=50.0, rate_burst=100)
    c = await clients(node)
    for i in range(60):
        c.send({"message": 5, "receiver": "x", "ref": i})
    for i in range(60):
        assert (await c.error("bad_field"))["ref"] == i


@ensure
async def test_a_well_behaved_client_gets_every_error(chatd, clients):
    """A few bad packets, each answered in turn, between good ones."""
    node = await chatd(rate_limit=50.0, rate_burst=100)
    c = await clients(node)
    for i in range(5):
        c.send({"ping": i})
        c.send(b"not json\n")
        c.send({"message": 5, "receiver": "x", "ref": i})
    for i in range(5):
        await c.expect("pong", ping=i)
        await c.error("bad_packet")
        assert (await c.error("bad_field"))["ref"] == i


@ensure
async def test_the_echo_of_control_bytes_costs_its_size(chatd, clients):
    """A ping of raw control bytes is echoed 6x larger: the pong's bytes are
    charged, so the next packet is over a burst of two."""
    node = await chatd(rate_limit=1.0, rate_burst=2)
    c = await clients(node)
    c.send(b"{'ping':'" + b"\x01" * 10000 + b"'}\n")  # 1 token in, 60 KB out
    pong = await c.expect("pong")
    assert pong["ping"] == "\x01" * 10000
    assert len(json.dumps(pong)) > 60000
    c.send({"ping": "next", "ref": "n"})
    err = await c.error("rate_limited")
    assert err["ref"] == "n"
