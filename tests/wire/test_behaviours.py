"""
Documented behaviours that each once had no test (issue 16, section 3): the
rate limit and acks, the ref record's scope, the store-wide back-pressure, a
failed ack, the auth clock and one-shot sends, keepalive pings, registering
again on the same connection. In-process chatd nodes on a real store.

Each test was run against chatd broken on purpose (the breakage is named in
its docstring) and failed.
"""

import os
import signal

import pytest
import pytest_twisted

from chatd.store import steps as store_module
from tests.helpers import pair, wait_until

ensure = pytest_twisted.ensureDeferred


@ensure
async def test_acks_do_not_count_against_the_rate_limit(chatd, clients, redis):
    """A phone acks every push; acks are free, so a big inbox never gets it
    rate_limited. (Broken: acks taken from the bucket like other packets.)"""
    node, a, b = await pair(chatd, clients, rate_limit=1.0, rate_burst=5)
    token = a.token
    # 20 messages for bob, from one-shot connections (each has its own bucket)
    for i in range(5):
        s = await clients(node)
        for k in range(4):
            s.send({"message": "ack me %d" % (4 * i + k), "receiver": "bob",
                    "sender": "alice", "token": token})
            await s.expect("accepted")
    pushes = [await b.expect("message") for _ in range(20)]
    # 20 acks, one per push: four times what is left of bob's bucket (5, less
    # the register); an ack of an id newly pushed is free
    b.send(b"".join(b'{"ack": "%s"}\n' % p["id"].encode() for p in pushes)
           + b'{"ping": "after the acks"}\n')
    assert await b.next() == {"type": "pong", "ping": "after the acks"}
    await wait_until(lambda: redis.command("LLEN", "chatd:{bob}:inbox") == 0,
                     what="the ack in the store")


@ensure
async def test_the_ref_record_is_scoped_to_the_receiver(chatd, clients):
    """A ref reused for another receiver is a new send, not a retry of the
    first. (Broken: the ref record keyed by sender and ref alone.)"""
    node, a, b = await pair(chatd, clients)
    c = await clients(node)
    await c.register("carol")
    a.send({"message": "for bob", "receiver": "bob", "ref": "r1"})
    await a.expect("accepted", ref="r1", receiver="bob")
    await b.expect("message", message="for bob")
    a.send({"message": "for carol", "receiver": "carol", "ref": "r1"})
    await a.expect("accepted", ref="r1", receiver="carol")
    assert [m.get("message") for m in await c.sync()] == ["for carol"]
    assert await b.sync() == []


@pytest.mark.slow
@ensure
async def test_a_saturated_store_stops_every_client_being_read(chatd, clients, own_redis,
                                                               monkeypatch):
    """Store-wide back-pressure: once HIGH_WATER sends are queued or in
    flight, no connection is read (not only the one that sent them) until
    the store has caught up; nothing is lost. The store is frozen (SIGSTOP)
    to hold the sends in flight; HIGH_WATER is lowered to 8 so that one
    connection reaches it below its own limit (MAX_INFLIGHT).
    (Broken: the protocol no longer checks ``store.saturated``.)"""
    monkeypatch.setattr(store_module, "HIGH_WATER", 8)
    monkeypatch.setattr(store_module, "LOW_WATER", 2)
    node, a, b = await pair(chatd, clients, own_redis.target, redis_timeout=30)
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        a.send(b"".join(b'{"message": "m%d", "receiver": "bob", "ref": %d}\n' % (i, i)
                        for i in range(20)))
        await wait_until(lambda: node.hub.store.saturated, what="the store saturated")
        # bob's first packet is read (and answered: a ping needs no store),
        # then bob is not read any more while the store is saturated
        b.send(b'{"ping": "p1"}\n{"ping": "p2"}\n')
        await b.expect("pong", ping="p1")
        with pytest.raises(AssertionError, match="no line"):
            await b.next(timeout=0.5)
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    await b.expect("pong", ping="p2")
    replies = [await a.expect("accepted") for _ in range(20)]
    assert sorted(r["ref"] for r in replies) == list(range(20))
    pushed = [await b.expect("message") for _ in range(20)]
    assert [m["message"] for m in pushed] == ["m%d" % i for i in range(20)]
    # stopped here, while its store is up: own_redis is torn down before the
    # chatd fixture, and the node's goodbye would wait its 30 s deadline
    await node.stop()


@pytest.mark.slow
@ensure
async def test_an_ack_the_store_cannot_take_is_answered_unavailable(chatd, clients, own_redis):
    """The phone is told its ack was not stored (so it acks again later).
    (Broken: the failed ack only dropped, not reported.)"""
    node, a, b = await pair(chatd, clients, own_redis.target, redis_timeout=0.5)
    a.send({"message": "ack me", "receiver": "bob"})
    await a.expect("accepted")
    push = await b.expect("message")
    own_redis.stop()
    b.send({"ack": push["id"]})
    e = await b.error("unavailable", timeout=5)
    assert push["id"] in e["reason"]
    own_redis.start().wait_ready()
    assert await node.service.client.when_connected(10), "chatd did not reconnect"
    b.send({"ack": push["id"]})
    assert await b.sync() == []
    await wait_until(lambda: own_redis.command("LLEN", "chatd:{bob}:inbox") == 0,
                     what="the ack in the store")


@ensure
async def test_a_one_shot_send_does_not_stop_the_auth_clock(chatd, clients):
    """sender + token on an unbound connection sends one message; the
    connection stays unbound, so auth_timeout still closes it.
    (Broken: the one-shot send cancels the auth timer.)"""
    node, a, b = await pair(chatd, clients, auth_timeout=2.0)
    c = await clients(node)
    c.send({"message": "one shot", "receiver": "bob", "sender": "alice", "token": a.token})
    await c.expect("accepted")
    await b.expect("message", message="one shot")
    await c.error("auth_timeout", timeout=10)
    await c.wait_closed()


@ensure
async def test_keepalive_pings_only_bound_connections(chatd, clients):
    """An unbound connection is never pinged (it has auth_timeout, then
    idle_timeout); a bound one is. (Broken: the keepalive ping sent to any
    silent connection.)"""
    node = await chatd(keepalive=0.2, idle_timeout=1.0)
    unbound = await clients(node)
    bound = await clients(node)
    await bound.register("pinged")
    await bound.expect("ping", timeout=5)
    # the first (and only) line the silent unbound connection gets
    await unbound.error("idle_timeout", timeout=10)
    await unbound.wait_closed()


@ensure
async def test_registering_again_on_the_same_connection_pushes_nothing_again(chatd, clients):
    """A second register on a bound connection gives a new token and keeps
    the pushes as they were: what was pushed is not pushed again, and new
    messages come once. (Broken: the second register restarts the delivery
    from the beginning of the inbox.)"""
    node, a, b = await pair(chatd, clients)
    a.send({"message": "m1", "receiver": "bob"})
    await a.expect("accepted")
    first = await b.expect("message", message="m1")
    old = b.token
    assert await b.register("bob") != old
    assert await b.sync() == []
    a.send({"message": "m2", "receiver": "bob"})
    await a.expect("accepted")
    assert [m["message"] for m in await b.sync()] == ["m2"]
    b.send({"ack": first["id"]})  # what was pushed before can still be acked
    assert await b.sync() == []
