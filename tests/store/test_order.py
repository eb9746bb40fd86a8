"""One connection, one order (contract 1.1): of two messages sent on one
connection to one receiver, the earlier gets the lower id and is pushed
first; the replies come in packet order. Above all in the first moments
after the store (re)starts, loses its script cache or its functions, which
is when an EVALSHA fallback used to run one batch behind later ones.

Many connections pipeline bursts of messages (one write each) through a real
store that is restarted and flushed between bursts; then every connection's
replies and the receiver's pushes are checked against the send order."""

import json
import signal

import pytest
import pytest_twisted

from tests.helpers import wait_until

ensure = pytest_twisted.ensureDeferred

SENDERS = 50
PER_BURST = 30


async def burst(senders, tag, replies):
    """Every sender writes PER_BURST messages, one write each, a reactor turn
    apart (as phones send: many store batches in flight at once); await
    every reply. ``replies[i]`` collects (ref, reply) for sender i in
    arrival order."""
    from twisted.internet import reactor, task
    for k in range(PER_BURST):
        for i, c in enumerate(senders):
            c.send({"message": "%s m%d from s%d" % (tag, k, i), "receiver": "bob",
                    "ref": "%s-%d" % (tag, k)})
        await task.deferLater(reactor, 0, lambda: None)
    for i, c in enumerate(senders):
        for k in range(PER_BURST):
            r = await c.next(timeout=30)
            replies[i].append(("%s-%d" % (tag, k), r))


def check_replies(replies):
    """Per connection: replies in packet order (each echoes the ref of the
    packet in that position), accepted ids strictly increasing. Returns
    {(sender, text): id} of what was accepted."""
    accepted = {}
    for i, rs in enumerate(replies):
        refs = [r.get("ref") for _, r in rs]
        assert refs == [ref for ref, _ in rs], "sender %d: replies out of order: %r" % (i, refs)
        ids = [r["id"] for _, r in rs if r["type"] == "accepted"]
        assert ids == sorted(ids) and len(set(ids)) == len(ids), \
            "sender %d: ids not increasing in send order: %r" % (i, ids)
        for ref, r in rs:
            assert r["type"] in ("accepted", "error"), r
            if r["type"] == "error":
                assert r["code"] == "unavailable", r
            else:
                tag, k = ref.split("-")
                accepted[(i, "%s m%s from s%d" % (tag, k, i))] = r["id"]
    return accepted


async def drain(c, accepted):
    """bob reconnects and reads everything; each accepted text is pushed
    once, under its id, in id order (so each sender's order is kept)."""
    want = len(accepted)
    pushes = []
    while len(pushes) < want:
        m = await c.next(timeout=30)
        assert m["type"] == "message", m
        pushes.append(m)
    ids = [m["id"] for m in pushes]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    got = {(int(m["message"].rsplit("s", 1)[1]), m["message"]): m["id"] for m in pushes}
    assert got == accepted


@pytest.mark.slow
@ensure
async def test_order_per_connection_across_store_restarts_and_flushes(chatd, clients, own_redis):
    node = await chatd(target=own_redis.target, redis_timeout=5.0, inbox_limit=100000)
    bob = await clients(node)
    token = await bob.register("bob")
    await bob.close()
    senders = []
    for i in range(SENDERS):
        c = await clients(node)
        await c.register("s%d" % i)
        senders.append(c)
    replies = [[] for _ in senders]

    # a fresh store: the node has just loaded its functions
    await burst(senders, "fresh", replies)
    for n in range(3):
        # an operator flushes the script cache (what used to be the trigger)
        own_redis.command("SCRIPT", "FLUSH")
        await burst(senders, "scriptflush%d" % n, replies)
        # the store is restarted (its data kept): the burst waits for the
        # node to reconnect, and runs right after it does
        own_redis.stop()
        own_redis.start()
        await own_redis.await_ready()
        await burst(senders, "restart%d" % n, replies)
    # the store is killed and started again while the node is connected; the
    # node notices, reconnects, and what is sent meanwhile waits or fails
    # (`unavailable`), never reorders
    own_redis.command("BGREWRITEAOF")
    await wait_until(lambda: b"aof_rewrite_in_progress:0" in own_redis.command("INFO", "persistence"))
    own_redis.kill(signal.SIGKILL)
    own_redis.start()
    await own_redis.await_ready()
    assert await node.service.client.when_connected(10)
    await burst(senders, "killed", replies)
    # an operator deletes chatd's functions: calls that meet that fail as
    # unavailable, the library is loaded again, nothing runs out of order
    own_redis.command("FUNCTION", "FLUSH")
    await burst(senders, "funcflush", replies)

    accepted = check_replies(replies)
    # almost everything went through (only the FUNCTION FLUSH may cost sends)
    assert len(accepted) >= SENDERS * PER_BURST * 8

    bob = await clients(node)
    await bob.reconnect("bob", token)
    await drain(bob, accepted)
    # stopped while its store is up (own_redis is torn down first)
    await node.stop()


@ensure
async def test_replies_keep_packet_order_when_an_error_is_ready_first(chatd, clients, redis):
    """A packet answered at once (bad_field, unknown_packet, a bad line) waits
    for the reply of a message before it that waits for the store; only a
    pong may overtake."""
    node = await chatd()
    a = await clients(node)
    await a.register("alice")
    await (await clients(node)).register("bob")
    a.proto.transport.write(
        b'{"message":"one","receiver":"bob","ref":1}\n'
        b'{"message":"two","receiver":"bob","ref":2,"sender":7}\n'
        b'not json\n'
        b'{"message":"three","receiver":"bob","ref":3}\n'
        b'{"ping":"x"}\n')
    got = [await a.next() for _ in range(5)]
    no_pong = [r for r in got if r["type"] != "pong"]
    assert [(r["type"], r.get("ref")) for r in no_pong] == [
        ("accepted", 1), ("error", 2), ("error", None), ("accepted", 3)]
    assert no_pong[1]["code"] == "bad_field" and no_pong[2]["code"] == "bad_packet"


@ensure
async def test_register_waits_for_earlier_replies(chatd, clients, redis):
    """A one-shot send, then a register on the same connection: the send's
    reply comes first, then `registered`, then the pushes."""
    node = await chatd()
    b = await clients(node)
    token = await b.register("bob")
    a = await clients(node)
    await a.register("alice")
    a_token = a.token
    await a.close()
    b.send({"message": "to alice", "receiver": "alice"})
    await b.expect("accepted")
    one = await clients(node)
    one.proto.transport.write(
        json.dumps({"message": "one-shot", "receiver": "bob", "sender": "alice",
                    "token": a_token, "ref": "os"}).encode() + b"\n"
        + json.dumps({"reconnect": "true", "sender": "alice", "token": a_token}).encode()
        + b"\n")
    await one.expect("accepted", ref="os")
    await one.expect("reconnected", sender="alice", pending=1)
    await one.expect("message", message="to alice")
    await b.expect("message", message="one-shot")
    assert token
