"""
The inbox's TTL (chatd/store/layout.py "inbox"): send.lua gives an inbox it
makes none (acks delete most of them again before another message comes),
and renews the TTL of one that already held messages; the inbox sweeper
(inbox_ttl.lua, InboxSteps.inbox_ttl_pass) gives an inbox left without one
the TTL of its newest line. Through a real store, and through a chatd.
"""

import pytest_twisted
from twisted.internet import defer, reactor

from chatd.app.config import Settings
from chatd.redis.client import RedisClient
from chatd.store import layout
from chatd.store.library import Library
from chatd.store.steps import Store
from chatd.wire import packets
from tests.helpers import pair, wait_until, with_deadline

ensure = pytest_twisted.ensureDeferred
TTL = 3600.0  # s


async def _store(redis, **settings):
    client = RedisClient(redis.target, 5.0, reactor, library=Library()).connect()
    assert await with_deadline(client.when_connected(5), what="connection")
    return client, Store(client, Settings(inbox_ttl=TTL, **settings), reactor, "nodeA")


async def _send(store, receiver, text):
    d = defer.Deferred()
    store.send_then(lambda result, failure: d.callback((result, failure)), "alice", receiver, text)
    result, failure = await with_deadline(d, what="the send")
    assert failure is None and result.status == "accepted", (result, failure)
    return result


def _line(sent_at, n=1):
    return (layout.ENTRY_HEAD + packets.format_id(n).encode() + layout.ENTRY_MID +
            b"%d" % sent_at + layout.push_tail("alice", "x", "hi"))


async def _sweep_all(store):
    """Inbox sweeper passes until the SCAN is round: (found, given) summed."""
    cursors, found, given = {}, 0, 0
    for _ in range(1000):
        f, g = await with_deadline(store.inbox_ttl_pass(cursors, 10), what="a pass")
        found, given = found + f, given + g
        if cursors["store"] in (b"0", 0):
            return found, given
    raise AssertionError("the SCAN never came round")


@pytest_twisted.ensureDeferred
async def test_an_inbox_gets_its_ttl_at_its_second_message(redis):
    client, store = await _store(redis)
    try:
        assert await store.register("bob", b"h" * 64) == "ok"
        await _send(store, "bob", "one")
        # made by this message: no TTL (an ack would delete it soon)
        assert redis.command("PTTL", "chatd:{bob}:inbox") == -1
        await _send(store, "bob", "two")
        assert 0 < redis.command("PTTL", "chatd:{bob}:inbox") <= TTL * 1000
        # acked to empty and made again: no TTL again
        acked = defer.Deferred()
        store.ack_then(acked.callback, "bob", 2)
        assert await with_deadline(acked, what="the ack") is None
        assert redis.command("EXISTS", "chatd:{bob}:inbox") == 0
        await _send(store, "bob", "three")
        assert redis.command("PTTL", "chatd:{bob}:inbox") == -1
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_the_sweep_gives_inboxes_without_a_ttl_their_newest_lines_ttl(redis):
    client, store = await _store(redis)
    try:
        now = int(reactor.seconds() * 1000)
        # one that a message made (no TTL), with two lines: the newest counts
        redis.command("RPUSH", "chatd:{a}:inbox", _line(now - 5000, 1), _line(now - 1000, 2))
        # one whose every line is older than the TTL: deleted
        redis.command("RPUSH", "chatd:{b}:inbox", _line(now - int(TTL * 1000) - 1000))
        # one that has a TTL: left as it is
        redis.command("RPUSH", "chatd:{c}:inbox", _line(now))
        redis.command("PEXPIRE", "chatd:{c}:inbox", 7777777)
        c_expiry = redis.command("PEXPIRETIME", "chatd:{c}:inbox")
        # a receipt as the newest line: its time
        receipt = (layout.RECEIPT_HEAD + packets.format_id(1).encode() +
                   b'","receiver":"r","status":"delivered","upto":"0000000000000001","at":%d}'
                   % (now - 2000))
        redis.command("RPUSH", "chatd:{d}:inbox", receipt)
        # other keys are not inboxes
        for i in range(30):
            redis.command("SET", "chatd:{n%d}:seq" % i, "1")
        found, given = await _sweep_all(store)
        assert (found, given) == (4, 3)
        assert redis.command("PEXPIRETIME", "chatd:{a}:inbox") == now - 1000 + TTL * 1000
        assert redis.command("EXISTS", "chatd:{b}:inbox") == 0
        assert redis.command("PEXPIRETIME", "chatd:{c}:inbox") == c_expiry
        assert redis.command("PEXPIRETIME", "chatd:{d}:inbox") == now - 2000 + TTL * 1000
        # a second sweep finds nothing to do
        assert await _sweep_all(store) == (3, 0)
    finally:
        await client.close()


@ensure
async def test_a_nodes_inbox_sweeper_gives_an_abandoned_inbox_its_ttl(chatd, clients, redis):
    """Wired in a chatd: bob gets one message and never comes back; his
    inbox is given the TTL of that message by the node's inbox sweeper."""
    node, a, b = await pair(chatd, clients, inbox_sweep=0.05)
    await b.close()
    a.send({"message": "are you there?", "receiver": "bob"})
    await a.expect("accepted")
    sent_at = layout.entry_sent_at(redis.command("LINDEX", "chatd:{bob}:inbox", 0))
    ttl_ms = int(Settings().inbox_ttl * 1000)
    await wait_until(lambda: redis.command("PEXPIRETIME", "chatd:{bob}:inbox") > 0,
                     what="the inbox's TTL")
    assert redis.command("PEXPIRETIME", "chatd:{bob}:inbox") == sent_at + ttl_ms
    # and counts it, in its metrics too (counted when the pass's reply is
    # in, which may be a moment after the store set the TTL seen above)
    sweeper = node.service.inbox_sweeper
    await wait_until(lambda: sweeper.given >= 1, what="the sweeper's count")
    from chatd.ops.metrics import registry_for
    given = registry_for(node.service).get_sample_value("chatd_inboxes_swept_total",
                                                        {"node": node.service.node_id})
    assert given == sweeper.given
