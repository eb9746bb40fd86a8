"""ack.lua through a real store: an ack takes the head first (one call for
the usual ack of one push); an ack of an id already acked puts the head back
as it was, its inbox TTL included when taking it had emptied the inbox."""

import pytest_twisted


async def _store(redis):
    from twisted.internet import reactor

    from chatd.app.config import Settings
    from chatd.redis.client import RedisClient
    from chatd.store.library import Library
    from chatd.store.steps import Store
    from tests.helpers import with_deadline
    client = RedisClient(redis.target, 5.0, reactor, library=Library()).connect()
    assert await with_deadline(client.when_connected(5), what="connection")
    store = Store(client, Settings(), reactor, "nodeA")
    assert await store.register("bob", b"h" * 64) == "ok"
    return client, store


async def _send(store, text):
    from twisted.internet import defer

    from tests.helpers import with_deadline
    d = defer.Deferred()
    store.send_then(lambda result, failure: d.callback((result, failure)), "alice", "bob", text)
    result, failure = await with_deadline(d, what="the send")
    assert failure is None and result.status == "accepted"
    return int(result.id)


async def _ack(store, upto):
    from twisted.internet import defer

    from tests.helpers import with_deadline
    d = defer.Deferred()
    store.ack_then(d.callback, "bob", upto)
    assert await with_deadline(d, what="the ack") is None


@pytest_twisted.ensureDeferred
async def test_a_repeated_ack_leaves_the_inbox_and_its_ttl_as_they_were(redis):
    client, store = await _store(redis)
    inbox = "chatd:{bob}:inbox"
    try:
        ids = [await _send(store, text) for text in ("one", "two", "three")]
        await _ack(store, ids[0])
        assert redis.command("LLEN", inbox) == 2
        await _ack(store, ids[0])  # again: the head (two) is put back
        stored = redis.command("LRANGE", inbox, 0, -1)
        assert [b'"message":"two"' in e for e in stored] == [True, False]
        await _ack(store, ids[1])
        assert redis.command("LLEN", inbox) == 1
        # the head taken empties the inbox, and goes back with a TTL
        await _ack(store, ids[1])
        assert redis.command("LLEN", inbox) == 1
        assert redis.command("PTTL", inbox) > 0
        # beyond the last id: everything up to it goes
        await _ack(store, ids[2] + 10)
        assert redis.command("EXISTS", inbox) == 0
        assert await _send(store, "four") == ids[2] + 1
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_an_ack_of_several_takes_them_all_and_no_more(redis):
    client, store = await _store(redis)
    inbox = "chatd:{bob}:inbox"
    try:
        ids = [await _send(store, "m%d" % i) for i in range(6)]
        await _ack(store, ids[3])
        stored = redis.command("LRANGE", inbox, 0, -1)
        assert [b'"message":"m4"' in stored[0], b'"message":"m5"' in stored[1]] == [True, True]
        assert redis.command("PTTL", inbox) > 0
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_one_ack_step_of_many_inboxes_takes_each_and_makes_their_receipts(redis):
    """Acks of one reactor turn are one ack.lua step: with receipts on, its
    KEYS are each inbox and then each one's rs; ten inboxes (more KEYS than
    ARGV) are each acked, and each opted-in sender's receipt made."""
    from twisted.internet import defer

    from tests.helpers import with_deadline
    client, store = await _store(redis)
    receivers = ["r%d" % i for i in range(10)]
    try:
        redis.command("DEL", "chatd:rcpt:turned")
        assert await store.register("alice", b"a" * 64, receipts=True) == "ok"
        for r in receivers:
            assert await store.register(r, b"h" * 64) == "ok"
        sent = []
        for r in receivers:
            d = defer.Deferred()
            store.send_then(lambda result, failure, d=d: d.callback(result), "alice", r, "hi")
            sent.append(int((await with_deadline(d, what="the send")).id))
        waits = []
        for r, upto in zip(receivers, sent):  # one turn: one step
            d = defer.Deferred()
            store.ack_then(d.callback, r, upto)
            waits.append(d)
        assert await with_deadline(defer.gatherResults(waits), what="the acks") == [None] * 10
        for r in receivers:
            assert redis.command("EXISTS", "chatd:{%s}:inbox" % r) == 0
        receipts = redis.command("LRANGE", "chatd:{alice}:inbox", 0, -1)
        assert sorted(b'"receiver":"%s"' % r.encode() in e for e in receipts
                      for r in receivers).count(True) == 10
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_rs_keeps_a_few_covered_senders_and_sheds_them_when_it_grows(redis):
    """An ack leaves the rs fields it covered while rs names at most 16
    senders (no delete and write again per ack), and deletes them past that."""
    from twisted.internet import defer

    from tests.helpers import with_deadline
    client, store = await _store(redis)
    rs = "chatd:{bob}:rs"
    try:
        for senders in (3, 20):
            last = 0
            for i in range(senders):
                d = defer.Deferred()
                store.send_then(lambda result, failure, d=d: d.callback(result),
                                "s%d" % i, "bob", "hi %d %d" % (senders, i))
                last = int((await with_deadline(d, what="the send")).id)
            assert redis.command("HLEN", rs) == senders
            await _ack(store, last)
            assert redis.command("HLEN", rs) == (3 if senders == 3 else 0)
    finally:
        await client.close()
