"""
Receipts (contract 1.2) across nodes and on Redis Cluster: a receipt for a
sender bound on another node reaches it live (the notify path of messages);
on a Cluster the sender's inbox is in another slot than the receiver's and
the receipt goes through the receiver's outbox (chatd.store.receipts),
including when the node dies between the two steps, when the sender's
primary is SIGKILLed between them, and when nothing but the outbox sweeper
(chatd.hub.sweeper) is left to move it.
"""

import json
import re

import pytest_twisted
from twisted.internet import defer

from tests.fixtures.cluster import wait_replicated
from tests.helpers import wait_until
from tests.hub.test_receipts import ON, quiet, send_all

ensure = pytest_twisted.ensureDeferred


@ensure
async def test_a_receipt_reaches_a_sender_bound_on_another_node_live(chatd, clients, redis):
    # a long lease: nothing periodic (a renewal, a catch-up) can deliver it
    a = await chatd(presence_lease=120)
    b = await chatd(presence_lease=120)
    alice, bob = await clients(a), await clients(b)
    await alice.register("alice", **ON)
    await bob.register("bob")
    ids = await send_all(alice, "bob", ["one", "two", "three"])
    for _ in ids:
        await bob.expect("message")
    bob.send({"ack": ids[1]})
    await alice.expect("receipt", receiver="bob", status="delivered", upto=ids[1])
    bob.send({"ack": ids[2]})
    await alice.expect("receipt", receiver="bob", status="delivered", upto=ids[2])
    bob.send({"read": ids[2], "from": "alice"})
    r = await alice.expect("receipt", receiver="bob", status="read", upto=ids[2])
    assert await quiet(alice) == []
    alice.send({"ack": r["id"]})
    await wait_until(lambda: not redis.command("LLEN", "chatd:{alice}:inbox"))
    assert await quiet(bob) == []


async def cluster_pair(chatd, clients, cluster, prefix, **settings):
    """alice and bob on two primaries, on two nodes of the cluster."""
    [[alice_id], [bob_id], _] = cluster.devices_on_each_primary(prefix, 1)
    a = await chatd(target=cluster.target, presence_lease=120, **settings)
    b = await chatd(target=cluster.target, presence_lease=120, **settings)
    alice, bob = await clients(a), await clients(b)
    token = await alice.register(alice_id, **ON)
    await bob.register(bob_id)
    return a, b, alice, bob, alice_id, bob_id, token


@ensure
async def test_on_a_cluster_receipts_cross_slots_live_and_offline(chatd, clients, cluster):
    a, b, alice, bob, alice_id, bob_id, token = await cluster_pair(
        chatd, clients, cluster, "rc-live")
    ids = await send_all(alice, bob_id, ["one", "two"])
    for _ in ids:
        await bob.expect("message")
    bob.send({"ack": ids[1]})
    await alice.expect("receipt", receiver=bob_id, status="delivered", upto=ids[1])
    bob.send({"read": ids[0], "from": alice_id})
    r = await alice.expect("receipt", receiver=bob_id, status="read", upto=ids[0])
    outbox = "chatd:{%s}:outbox" % bob_id
    await wait_until(lambda: not cluster.command(bob_id, "EXISTS", outbox),
                     what="the outbox emptied")
    alice.send({"ack": r["id"]})
    await wait_until(lambda: not cluster.command(
        alice_id, "LLEN", "chatd:{%s}:inbox" % alice_id))
    # the offline sender: stored in its own slot, pending, pushed on reconnect
    await alice.close()
    more = await send_all(bob, bob_id, ["self"])  # bob's own inbox moves on
    await bob.expect("message")
    bob.send({"read": ids[1], "from": alice_id})
    bob.send({"ack": more[0]})
    await wait_until(lambda: cluster.command(
        alice_id, "LLEN", "chatd:{%s}:inbox" % alice_id) == 1)
    alice = await clients(b)
    reply = await alice.reconnect(alice_id, token, **ON)
    assert reply["pending"] == 1
    await alice.expect("receipt", receiver=bob_id, status="read", upto=ids[1])


def hset_calls(node):
    """HSETs a valkey ran so far (its own and its functions')."""
    stat = node.info("commandstats").get("cmdstat_hset") or "calls=0"
    return int(re.search(r"calls=(\d+)", str(stat)).group(1))


@ensure
async def test_on_a_cluster_only_opted_in_senders_reach_the_outbox_and_a_later_opt_in_counts(
        chatd, clients, cluster):
    """Senders who did not opt in get no outbox entry at the ack (nothing to
    move); a sender who opts in after sending, on another node than the
    ack's, still gets its receipt (the ack's node reads chatd:rcpt:turned,
    which that bind raised, from its own slot)."""
    [[alice_id, carol_id], [bob_id, _], _] = cluster.devices_on_each_primary("rc-turn", 2)
    a = await chatd(target=cluster.target, presence_lease=120)
    b = await chatd(target=cluster.target, presence_lease=120)
    turned = "chatd:rcpt:turned"
    cluster.command(turned, "DEL", turned)  # the nodes' starts cover nothing below
    alice, carol, bob = await clients(a), await clients(a), await clients(b)
    token = await alice.register(alice_id)
    await carol.register(carol_id)
    await bob.register(bob_id)
    ids = await send_all(alice, bob_id, ["one", "two"])
    c_ids = await send_all(carol, bob_id, ["three"])
    for _ in range(3):
        await bob.expect("message")
    assert not cluster.command(bob_id, "EXISTS", "chatd:{%s}:rs" % bob_id)
    # no one opted in: the ack leaves nothing in the outbox, nothing is made
    bob.send({"ack": ids[0]})
    outbox = "chatd:{%s}:outbox" % bob_id
    writes = hset_calls(cluster.owner(bob_id))
    await wait_until(lambda: cluster.command(bob_id, "LINDEX", "chatd:{%s}:inbox" % bob_id, 0)
                     and json.loads(cluster.command(
                         bob_id, "LINDEX", "chatd:{%s}:inbox" % bob_id, 0))["id"] == ids[1])
    assert hset_calls(cluster.owner(bob_id)) == writes
    assert not cluster.command(bob_id, "EXISTS", outbox)
    assert await quiet(alice) == [] and await quiet(carol) == []
    # alice opts in, on node b, after sending; carol does not
    await alice.close()
    alice = await clients(b)
    await alice.reconnect(alice_id, token, **ON)
    bob.send({"ack": c_ids[0]})
    await alice.expect("receipt", receiver=bob_id, status="delivered", upto=ids[1])
    await wait_until(lambda: not cluster.command(bob_id, "EXISTS", outbox))
    assert await quiet(carol) == [] and not cluster.command(
        carol_id, "LLEN", "chatd:{%s}:inbox" % carol_id)


@ensure
async def test_on_a_cluster_a_node_dying_between_the_steps_loses_no_receipt(
        chatd, clients, cluster):
    """The ack's step writes the outbox; the node "dies" before it moves it
    (its move is cut off); the receipt is made by the receiver's next ack on
    another node, and by the receiver's next bind."""
    a, b, alice, bob, alice_id, bob_id, token = await cluster_pair(
        chatd, clients, cluster, "rc-die")
    ids = await send_all(alice, bob_id, ["one", "two"])
    for _ in ids:
        await bob.expect("message")
    from twisted.internet import defer
    b.hub.store._move_group = lambda group: defer.succeed(False)  # dies here
    bob.send({"ack": ids[0]})
    outbox = "chatd:{%s}:outbox" % bob_id
    await wait_until(lambda: cluster.command(bob_id, "HGET", outbox, "%s delivered" % alice_id))
    assert await quiet(alice) == []
    # bob's connection moves to node a (b is "dead"); its bind sweeps the outbox
    bob2 = await clients(a)
    await bob2.reconnect(bob_id, bob.token)
    r = await alice.expect("receipt", receiver=bob_id, status="delivered", upto=ids[0])
    await wait_until(lambda: not cluster.command(bob_id, "EXISTS", outbox))
    # once: nothing more, and the next ack makes the next one
    assert await quiet(alice) == []
    await bob2.expect("message")
    bob2.send({"ack": ids[1]})
    r2 = await alice.expect("receipt", receiver=bob_id, status="delivered", upto=ids[1])
    assert r2["id"] > r["id"]


@ensure
async def test_on_a_cluster_the_sweeper_moves_a_receipt_left_behind(chatd, clients, cluster):
    """Node b dies between the ack's step and the move (its moves are cut
    off: it never makes them), and bob never acks nor binds again: node a's
    outbox sweeper finds the entry and makes the receipt, once."""
    a, b, alice, bob, alice_id, bob_id, token = await cluster_pair(
        chatd, clients, cluster, "rc-sweep", outbox_sweep=0.3)
    ids = await send_all(alice, bob_id, ["one"])
    await bob.expect("message")
    b.hub.store._move_group = lambda group: defer.succeed(False)  # b "dies" here
    bob.send({"ack": ids[0]})
    outbox = "chatd:{%s}:outbox" % bob_id
    await wait_until(lambda: cluster.command(bob_id, "HGET", outbox, "%s delivered" % alice_id))
    await alice.expect("receipt", receiver=bob_id, status="delivered", upto=ids[0])
    await wait_until(lambda: not cluster.command(bob_id, "EXISTS", outbox),
                     what="the outbox emptied")
    await wait_until(lambda: swept(a) == 1, what="a's sweep pass over")
    assert swept(b) == 0
    assert await quiet(alice) == [] and await quiet(bob) == []


def swept(node):
    """chatd_receipts_swept_total of a node, as Prometheus would read it."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from chatd.ops.metrics import registry_for
    text = generate_latest(registry_for(node.service)).decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "chatd_receipts_swept_total")


def hold_moves(*nodes):
    """Every outbox move of these nodes (an ack's, a sweep's) waits until
    ``release()``; ``reached`` fires at the first, ``moves`` are their
    Deferreds (each fires when that move is over, failed or not)."""
    class Held:
        reached, gate, moves = defer.Deferred(), defer.Deferred(), []

        def release(self):
            self.gate.callback(None)

    held = Held()
    for node in nodes:
        store = node.hub.store
        original = store._move_group

        def move(group, original=original):
            if held.gate.called:
                return original(group)
            d = defer.Deferred()
            held.moves.append(d)
            held.gate.addCallback(lambda _: original(group).chainDeferred(d))
            if not held.reached.called:
                held.reached.callback(None)
            return d

        store._move_group = move
    return held


@ensure
async def test_on_a_cluster_a_primary_sigkilled_between_the_steps_loses_no_receipt(
        chatd, clients, cluster, failover):
    """The ack's step writes bob's outbox (bob's slot); before the move into
    alice's inbox (alice's slot, another primary), alice's primary is
    SIGKILLed; the move fails; the replica takes over, and the receipt
    reaches alice exactly once (the sweeper: bob acks nothing more)."""
    a, b, alice, bob, alice_id, bob_id, token = await cluster_pair(
        chatd, clients, cluster, "rc-kill", outbox_sweep=0.3)
    ids = await send_all(alice, bob_id, ["one", "two"])
    for _ in ids:
        await bob.expect("message")
    primary = cluster.owner(alice_id)
    assert primary is not cluster.owner(bob_id)
    wait_replicated(primary, cluster.replica_of(primary))
    held = hold_moves(a, b)
    bob.send({"ack": ids[1]})
    await held.reached  # the ack's step is done, its move not begun
    outbox = "chatd:{%s}:outbox" % bob_id
    field = "%s delivered" % alice_id
    assert cluster.command(bob_id, "HGET", outbox, field)
    failover.kill(primary)
    held.release()
    await defer.DeferredList(list(held.moves))
    assert cluster.command(bob_id, "HGET", outbox, field), "moved into a dead primary?"
    failover.take_over()
    await alice.expect("receipt", receiver=bob_id, status="delivered", upto=ids[1])
    await wait_until(lambda: not cluster.command(bob_id, "EXISTS", outbox),
                     what="the outbox emptied")
    assert await quiet(alice) == []
    stored = [json.loads(e) for e in cluster.command(
        alice_id, "LRANGE", "chatd:{%s}:inbox" % alice_id, 0, -1)]
    assert [(r["type"], r["upto"]) for r in stored] == [("receipt", ids[1])]
