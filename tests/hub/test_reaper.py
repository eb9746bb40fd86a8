"""
Node heartbeats and the reaper (chatd.hub.presence, chatd.store.nodes): a
dead node's presence records are deleted by a live node, not by a lease on
each record; a node cut off from the store for a whole lease writes its
records again. Real store, real nodes in this process.
"""

import pytest_twisted

from tests.helpers import wait_until

ensure = pytest_twisted.ensureDeferred


def reaped(node):
    """chatd_presence_reaped_total of a node, as Prometheus would read it."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from chatd.ops.metrics import registry_for
    text = generate_latest(registry_for(node.service)).decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "chatd_presence_reaped_total")


def dead_node_record(redis, device, node, epoch=7):
    """A record of a node that is not beating (as a SIGKILLed node's is):
    in the node set, no heartbeat, a record with a long expiry."""
    redis.command("SADD", "chatd:{nodes}", node)
    redis.command("SET", "chatd:{%s}:epoch" % device, epoch)
    redis.command("SET", "chatd:{%s}:node" % device, "%s %d" % (node, epoch), "PX", 600000)


@ensure
async def test_a_dead_nodes_records_are_reaped_by_a_live_node(chatd, clients, redis):
    for i in range(30):
        dead_node_record(redis, "gone%d" % i, "deadbeef0001")
    dead_node_record(redis, "gone-too", "deadbeef0002")
    # a node that beats (its heartbeat is there): its record stays
    redis.command("SADD", "chatd:{nodes}", "a11fe0000001")
    redis.command("SET", "chatd:{nodes}:live:a11fe0000001", "1", "PX", 600000)
    redis.command("SET", "chatd:{kept}:node", "a11fe0000001 3", "PX", 600000)
    a = await chatd(presence_lease=0.6)
    bob = await clients(a)
    await bob.register("bob")
    await wait_until(lambda: redis.command("EXISTS", *["chatd:{gone%d}:node" % i
                                                       for i in range(30)]) == 0,
                     what="the dead node's records reaped")
    await wait_until(lambda: redis.command("EXISTS", "chatd:{gone-too}:node") == 0)
    # the dead are forgotten, the living kept
    await wait_until(lambda: set(redis.command("SMEMBERS", "chatd:{nodes}")) == {
        b"a11fe0000001", a.hub.node_id.encode()})
    assert redis.command("GET", "chatd:{kept}:node") == b"a11fe0000001 3"
    assert redis.command("GET", "chatd:{bob}:node").split()[0] == a.hub.node_id.encode()
    await wait_until(lambda: reaped(a) == 31, what="the reap counted")


@ensure
async def test_a_record_bound_again_meanwhile_is_not_reaped(chatd, clients, redis):
    """The reaper deletes a record only if it still names the dead node:
    a device that reconnected elsewhere keeps its new record."""
    dead_node_record(redis, "bob", "deadbeef0003")
    a = await chatd(presence_lease=0.6)
    bob = await clients(a)
    await bob.register("bob")  # a new epoch, this node's
    await wait_until(lambda: redis.command("SMEMBERS", "chatd:{nodes}") == [
        a.hub.node_id.encode()], what="the dead node forgotten")
    assert redis.command("GET", "chatd:{bob}:node").split()[0] == a.hub.node_id.encode()


@ensure
async def test_a_node_cut_off_for_a_lease_writes_its_records_again(chatd, clients, redis):
    """As if this node had been cut off from the store for a whole lease
    and reaped: its heartbeat and every record gone. Its next heartbeat
    finds out, and it writes its records again (their epochs are still its
    own); a message for one of its devices, sent through another node, is
    pushed live."""
    a = await chatd(presence_lease=0.6)
    b = await chatd(presence_lease=120)
    bob, alice = await clients(a), await clients(b)
    await bob.register("bob")
    await alice.register("alice")
    mine = redis.command("GET", "chatd:{bob}:node")
    redis.command("DEL", "chatd:{nodes}:live:" + a.hub.node_id, "chatd:{bob}:node")
    await wait_until(lambda: redis.command("GET", "chatd:{bob}:node") == mine,
                     what="the record written again")
    # by the check of every record on finding its heartbeat gone (the
    # slices alone would take RECORD_LEASES ticks with more devices)
    assert a.service.presence._again is not None
    alice.send({"message": "still here?", "receiver": "bob"})
    await alice.expect("accepted")
    await bob.expect("message", message="still here?")


@ensure
async def test_a_node_that_stops_leaves_at_once(chatd, clients, redis):
    """A graceful stop deletes the heartbeat: another node reaps whatever
    the stopping node could not release, without waiting a lease."""
    a = await chatd(presence_lease=120)
    b = await chatd(presence_lease=0.6)
    live = "chatd:{nodes}:live:" + a.hub.node_id
    assert redis.command("EXISTS", live) == 1
    redis.command("SET", "chatd:{stuck}:node", a.hub.node_id + " 4", "PX", 600000)
    await a.stop()
    assert redis.command("EXISTS", live) == 0
    await wait_until(lambda: redis.command("EXISTS", "chatd:{stuck}:node") == 0,
                     what="the stopped node's record reaped")
    # (the count is taken when the reap is over: after the SCAN that deleted it)
    await wait_until(lambda: reaped(b) == 1, what="the reap counted")
