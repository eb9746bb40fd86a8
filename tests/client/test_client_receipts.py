"""
The terminal client and receipts (contract 1.2): it opts in (``--no-receipts``
opts out), shows "delivered" and "read" under what was sent, and
``--listen`` prints receipts as JSON lines.
"""

import json

import pytest_twisted

from chatd.client.formatting import format_receipt
from tests.fixtures.client_session import make_session, push
from tests.helpers import registered, wait_until

ensure = pytest_twisted.ensureDeferred


def receipt(n, status, upto):
    return {"type": "receipt", "id": "%016d" % n, "receiver": "bob", "status": status,
            "upto": "%016d" % upto, "at": 1}


def test_the_session_opts_in_and_shows_and_acks_receipts(tmp_path):
    session, server, ui, clock, tokens = make_session(tmp_path, receipts=True)
    session.start()
    assert server.written() == [{"register": "true", "sender": "alice", "receipts": "true"}]
    server.say({"type": "registered", "sender": "alice", "token": "T1"})
    server.say(push(1, "hi"), receipt(2, "delivered", 7), receipt(3, "read", 7))
    assert ui.shown == ["hi"]
    assert ui.receipts == [("delivered", "%016d" % 7), ("read", "%016d" % 7)]
    assert server.written() == [{"ack": "%016d" % 3}]
    server.drop()
    clock.advance(0.5)
    assert server.written() == [{"reconnect": "true", "sender": "alice", "token": "T1",
                                 "receipts": "true"}]


def test_receipts_in_words():
    assert format_receipt(receipt(2, "delivered", 7)) == \
        "  \u2713\u2713 delivered to bob (up to 0000000000000007)"
    assert format_receipt(receipt(2, "read", 7)).startswith("  \u2713\u2713 read by bob")


@ensure
async def test_listen_prints_receipts_as_json_and_no_receipts_opts_out(
        chatd, clients, client, redis):  # noqa: F811
    node = await chatd()
    bob = await registered(clients, node, "bob")
    sent = client(node.port, "--id", "alice", "--send", "bob", "hello")
    assert await sent.exited() == 0, sent.err
    listener = client(node.port, "--id", "alice", "--listen")
    await listener.wait_for(r"connected to .* as alice", stream="err")
    assert redis.command("GET", "chatd:{alice}:rcpt") == b"1"
    m = await bob.expect("message", message="hello")
    bob.send({"ack": m["id"]})
    [line] = await listener.wait_for(r'(?m)^\{"type":"receipt".*\}$')
    r = json.loads(line)
    assert (r["receiver"], r["status"], r["upto"]) == ("bob", "delivered", m["id"])
    await wait_until(lambda: not redis.command("LLEN", "chatd:{alice}:inbox"), what="its ack")
    listener.transport.signalProcess("TERM")
    assert await listener.exited() == 0
    quiet = client(node.port, "--id", "alice", "--listen", "--no-receipts")
    await quiet.wait_for(r"connected to .* as alice", stream="err")
    assert redis.command("GET", "chatd:{alice}:rcpt") is None
    quiet.transport.signalProcess("TERM")
    assert await quiet.exited() == 0
