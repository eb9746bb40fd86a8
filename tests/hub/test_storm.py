"""
A reconnect storm at small size (issue 24): hundreds of devices, each with
messages waiting, all reconnect at once to a real chatd on the real store.
Every device gets exactly its messages, in order, once; the node binds at
most ``bind_turns`` devices and reads at most ``drain_reads`` inbox batches
at once (the others wait their turn: store calls stay within their deadline
and memory stays bounded however many start together); and a device with
far more waiting than the others, whose client does not read, holds none of
them back.
"""

import pytest_twisted

from tests.helpers import with_deadline

ensure = pytest_twisted.ensureDeferred

SMALL = 499      # devices with a few messages waiting
EACH = 5
BIG = 400        # messages waiting for the one big device
READS = 4        # drain_reads: inbox reads in flight on the node at most
BINDS = 8        # bind_turns: registers and reconnects in flight at most


async def _read(client, n, ack=True):
    """The texts of the next n pushes (acking the last); fails on anything
    else but a pong."""
    texts = []
    while len(texts) < n:
        msg = await client.next()
        assert msg["type"] == "message", msg
        texts.append(msg["message"])
        if ack and len(texts) == n:
            client.send({"ack": msg["id"]})
    return texts


@ensure
async def test_a_storm_is_served_completely_in_order_in_bounded_turns(chatd, clients):
    from twisted.internet import defer
    node = await chatd(rate_limit=0, drain_batch=10, drain_reads=READS, bind_turns=BINDS)
    names = ["s%03d" % i for i in range(SMALL)] + ["big"]
    tokens = {}
    first = [await clients(node) for _ in names]
    regs = [defer.ensureDeferred(c.register(d)) for c, d in zip(first, names)]
    for d, t in zip(names, await defer.gatherResults(regs)):
        tokens[d] = t
    for c in first:  # every phone goes away
        await c.close()

    sender = await clients(node)
    await sender.register("sender")
    for i in range(BIG):
        sender.send({"message": "b%d" % i, "receiver": "big"})
    for d in names[:-1]:
        for i in range(EACH):
            sender.send({"message": "m%d" % i, "receiver": d})
    replies = [await sender.next() for _ in range(BIG + SMALL * EACH)]
    assert {r["type"] for r in replies} == {"accepted"}

    # all come back at once; the big one's client reads nothing for now
    conns = [await clients(node) for _ in names]
    big = conns[-1]
    big.proto.transport.pauseProducing()
    for c, d in zip(conns, names):
        c.send({"reconnect": "true", "sender": d, "token": tokens[d]})
    pending = [defer.ensureDeferred(c.expect("reconnected", sender=d))
               for c, d in zip(conns[:-1], names[:-1])]
    got = await with_deadline(defer.gatherResults(pending), 30, "every small reconnect")
    assert all(r["pending"] == EACH for r in got)
    texts = await with_deadline(defer.gatherResults(
        [defer.ensureDeferred(_read(c, EACH)) for c in conns[:-1]]), 30, "every small drain")
    # each small device: its messages, in order, once
    assert all(t == ["m%d" % i for i in range(EACH)] for t in texts)

    big.proto.transport.resumeProducing()
    await big.expect("reconnected", sender="big", pending=BIG)
    assert await with_deadline(defer.ensureDeferred(_read(big, BIG)), 30,
                               "the big drain") == ["b%d" % i for i in range(BIG)]
    # nothing more for anyone (a push twice would be here before the pong)
    for c in conns:
        assert await c.sync() == []

    for turns, bound in ((node.hub.reads, READS), (node.hub.binds, BINDS)):
        assert turns.peak == bound          # never more in flight than the bound...
        assert turns.peak_waiting > 0       # ...with the others queued behind it
        assert (turns.busy, turns.waiting) == (0, 0)
