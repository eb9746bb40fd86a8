"""
Several nodes, one service (contract 1.1, "Several nodes and stores"): three
chatd nodes on one store, in this process (each with its own store client
and subscriber connection, exactly as separate processes have them).
tests/system/test_nodes_procs.py has the ones that need real processes (SIGKILL).
"""

import json
import random

import pytest
import pytest_twisted

from tests.helpers import pass_time, wait_until

ensure = pytest_twisted.ensureDeferred


async def three(chatd, **settings):
    return [await chatd(**settings) for _ in range(3)]


def presence(redis, device):
    value = redis.command("GET", "chatd:{%s}:node" % device)
    return value.decode().split()[0] if value else None


@ensure
async def test_a_message_accepted_on_one_node_is_pushed_at_once_on_another(
        chatd, clients, redis):
    # a long lease: nothing periodic (a renewal) can be what delivers it
    a, b, _ = await three(chatd, presence_lease=120)
    assert len({n.hub.node_id for n in (a, b)}) == 2
    bob = await clients(b)
    await bob.register("bob")
    assert presence(redis, "bob") == b.hub.node_id
    alice = await clients(a)
    await alice.register("alice")
    for i in range(20):
        alice.send({"message": "hi %d" % i, "receiver": "bob", "ref": i})
    ids = [(await alice.expect("accepted"))["id"] for _ in range(20)]
    # live: pushed without bob doing anything (no reconnect, no poll)
    pushed = [await bob.expect("message") for _ in range(20)]
    assert [p["id"] for p in pushed] == ids
    assert [p["message"] for p in pushed] == ["hi %d" % i for i in range(20)]
    # and bob's acks (on B) empty the inbox the message was stored in by A
    bob.send({"ack": ids[-1]})
    await wait_until(lambda: redis.command("LLEN", "chatd:{bob}:inbox") == 0)


@ensure
async def test_register_on_another_node_replaces_the_connection(chatd, clients, redis):
    # a long lease: the kick must do it, not the next renewal
    a, b, _ = await three(chatd, presence_lease=120)
    old = await clients(a)
    token = await old.register("bob")
    new = await clients(b)
    await new.reconnect("bob", token)
    await old.error("session_replaced")
    await old.wait_closed()
    assert "bob" not in a.hub.sessions and "bob" in b.hub.sessions
    assert presence(redis, "bob") == b.hub.node_id
    # A's closing did not take B's presence record with it
    alice = await clients(a)
    await alice.register("alice")
    alice.send({"message": "still there?", "receiver": "bob"})
    await alice.expect("accepted")
    await new.expect("message", message="still there?")


@ensure
async def test_simultaneous_registers_on_three_nodes_leave_exactly_one(chatd, clients, redis):
    nodes = await three(chatd, presence_lease=120)
    for round in range(20):
        device = "dev%d" % round
        cs = [await clients(n) for n in nodes]
        order = list(range(3))
        random.shuffle(order)
        for i in order:  # three writes in one reactor turn
            cs[i].send({"register": "true", "sender": device})
        # two are sent session_replaced and closed (a register that lost
        # the race may be answered first); the third stays bound, on its node
        await wait_until(lambda: sum(c.closed.called for c in cs) == 2,
                         what="two of the three connections closed")
        winner = [i for i, c in enumerate(cs) if not c.closed.called]
        assert len(winner) == 1
        winner = winner[0]
        for i, c in enumerate(cs):
            lines = [json.loads(raw) for raw in c.raw]
            if i == winner:
                assert [m["type"] for m in await c.sync()] == ["registered"], lines
            else:
                assert lines[-1]["code"] == "session_replaced", lines
        assert [device in n.hub.sessions for n in nodes].count(True) == 1
        assert device in nodes[winner].hub.sessions
        assert presence(redis, device) == nodes[winner].hub.node_id
        await pass_time(0.05)
        assert sum(device in n.hub.sessions for n in nodes) == 1


@ensure
async def test_reconnect_on_another_node_gets_every_unacked_message(chatd, clients, redis):
    a, b, c = await three(chatd)
    bob = await clients(a)
    token = await bob.register("bob")
    alice = await clients(c)
    await alice.register("alice")
    for i in range(5):
        alice.send({"message": "m%d" % i, "receiver": "bob"})
        await alice.expect("accepted")
    pushed = [await bob.expect("message") for _ in range(5)]
    bob.send({"ack": pushed[1]["id"]})  # acks two of them
    await wait_until(lambda: redis.command("LLEN", "chatd:{bob}:inbox") == 3)
    await bob.close()
    await wait_until(lambda: "bob" not in a.hub.sessions)
    alice.send({"message": "while away", "receiver": "bob"})
    await alice.expect("accepted")
    bob = await clients(b)
    r = await bob.reconnect("bob", token)
    assert r["pending"] == 4
    again = [await bob.expect("message") for _ in range(4)]
    assert [m["id"] for m in again[:3]] == [p["id"] for p in pushed[2:]]
    assert again[3]["message"] == "while away"
    # live on B from now on
    alice.send({"message": "live", "receiver": "bob"})
    await alice.expect("accepted")
    await bob.expect("message", message="live")


@ensure
async def test_dedup_and_refs_hold_across_nodes(chatd, clients):
    a, b, c = await three(chatd)
    bob = await clients(c)
    await bob.register("bob")
    alice = await clients(a)
    token = await alice.register("alice")
    alice.send({"message": "same text", "receiver": "bob", "ref": "r1"})
    first = await alice.expect("accepted")
    carol = await clients(b)
    await carol.register("carol")
    carol.send({"message": "same text", "receiver": "bob"})
    await carol.expect("duplicate")
    # alice's retry of r1, one-shot on another node: the first reply again
    other = await clients(b)
    other.send({"message": "same text", "receiver": "bob", "ref": "r1",
                "sender": "alice", "token": token})
    await other.expect("accepted", id=first["id"])
    assert (await bob.expect("message"))["id"] == first["id"]
    assert await bob.sync() == []  # pushed once


@ensure
async def test_revoked_notification_closes_the_connection_with_revoked(
        chatd, clients, redis):
    """What ``chatd-admin revoke ID`` does (developer i12): SET the token to
    "revoked", then SPUBLISH "revoked" on the device's channel."""
    a, b, _ = await three(chatd)
    bob = await clients(b)
    token = await bob.register("bob")
    redis.command("SET", "chatd:{bob}:token", "revoked")
    assert redis.command("SPUBLISH", "chatd:{bob}:notify", "revoked") == 1
    await bob.error("revoked")
    await bob.wait_closed()
    await wait_until(lambda: redis.command("GET", "chatd:{bob}:node") is None)
    again = await clients(a)
    again.send({"reconnect": "true", "sender": "bob", "token": token})
    await again.error("bad_token")


@ensure
async def test_killed_subscriber_connections_lose_nothing_and_come_back(
        chatd, clients, redis):
    """CLIENT KILL TYPE pubsub: a message sent while B's subscriber
    connection is down still arrives (the catch-up after it resubscribes),
    and B is live again after."""
    a, b, _ = await three(chatd)
    bob = await clients(b)
    await bob.register("bob")
    alice = await clients(a)
    await alice.register("alice")
    for round in range(3):
        subscribed = b.service.presence.notifications.subscriber._connections
        assert redis.command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
        alice.send({"message": "in the gap %d" % round, "receiver": "bob"})
        await alice.expect("accepted")
        await bob.expect("message", message="in the gap %d" % round)
        await wait_until(lambda: b.service.presence.notifications.subscriber._connections > subscribed
                         and b.service.presence.notifications.subscriber.connected)
        await wait_until(lambda: redis.command("PUBSUB", "SHARDNUMSUB",
                                               "chatd:{bob}:notify")[1] == 1)
        alice.send({"message": "live %d" % round, "receiver": "bob"})
        await alice.expect("accepted")
        await bob.expect("message", message="live %d" % round)
    assert await bob.sync() == []


@ensure
async def test_a_node_that_lost_its_lease_record_closes_the_connection(
        chatd, clients, redis):
    """A lost kick (here: the record is overwritten behind the node's back)
    is found by the next renewal: the old connection is closed."""
    a, = [await chatd(presence_lease=0.6)]
    bob = await clients(a)
    await bob.register("bob")
    redis.command("SET", "chatd:{bob}:node", "othernode 99", "PX", 10000)
    await bob.error("session_replaced", timeout=5)
    assert "bob" not in a.hub.sessions


@ensure
async def test_the_heartbeat_and_the_record_are_renewed_while_bound(chatd, clients, redis):
    a, = [await chatd(presence_lease=0.6)]
    bob = await clients(a)
    await bob.register("bob")
    live = "chatd:{nodes}:live:" + a.hub.node_id
    await pass_time(1.5)  # longer than the lease: the heartbeat must have been renewed
    assert presence(redis, "bob") == a.hub.node_id
    assert 0 < redis.command("PTTL", live) <= 600
    assert a.hub.node_id.encode() in redis.command("SMEMBERS", "chatd:{nodes}")
    # the record's expiry is a backstop (60 leases), renewed a slice at a time
    assert 600 < redis.command("PTTL", "chatd:{bob}:node") <= 36000
    redis.command("PEXPIRE", "chatd:{bob}:node", 5000)
    await wait_until(lambda: redis.command("PTTL", "chatd:{bob}:node") > 5000)


@ensure
async def test_the_presence_record_goes_when_the_connection_does(chatd, clients, redis):
    a, = [await chatd(presence_lease=120)]
    bob = await clients(a)
    await bob.register("bob")
    assert presence(redis, "bob") == a.hub.node_id
    await bob.close()
    await wait_until(lambda: redis.command("EXISTS", "chatd:{bob}:node") == 0)
    assert redis.command("PUBSUB", "SHARDNUMSUB", "chatd:{bob}:notify")[1] == 0


def spublish_calls(redis):
    for line in redis.command("INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_spublish:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


@ensure
async def test_no_publish_when_the_receiver_is_here_or_offline(chatd, clients, redis):
    """The single-node path costs no publish: only a receiver held by
    another node gets one."""
    a, b, _ = await three(chatd)
    carol = await clients(b)
    await carol.register("carol")
    await carol.close()
    await wait_until(lambda: redis.command("EXISTS", "chatd:{carol}:node") == 0)
    bob = await clients(a)
    await bob.register("bob")
    alice = await clients(a)
    await alice.register("alice")
    calls = spublish_calls(redis)
    alice.send({"message": "local", "receiver": "bob"})
    await alice.expect("accepted")
    await bob.expect("message", message="local")
    alice.send({"message": "offline", "receiver": "carol"})
    await alice.expect("accepted")
    assert spublish_calls(redis) == calls
    dave = await clients(b)
    await dave.register("dave")
    alice.send({"message": "remote", "receiver": "dave"})
    await alice.expect("accepted")
    await dave.expect("message", message="remote")
    assert spublish_calls(redis) == calls + 1


@pytest.mark.slow
@ensure
async def test_a_hundred_devices_on_three_nodes(chatd, clients, redis):
    """~100 devices spread over 3 nodes send to each other: everything is
    delivered, nothing twice on one connection, each sender's order kept."""
    nodes = await three(chatd)
    n = 99
    devices = []
    for i in range(n):
        c = await clients(nodes[i % 3])
        await c.register("d%d" % i)
        devices.append(c)
    rnd = random.Random(7)
    sent = {}  # receiver -> [(sender, k)] in send order per sender
    per = 10
    for k in range(per):
        for i, c in enumerate(devices):
            j = rnd.randrange(n - 1)
            j += j >= i
            c.send({"message": "d%d #%d" % (i, k), "receiver": "d%d" % j})
            sent.setdefault(j, []).append((i, k))
    for j, c in enumerate(devices):
        want = sent.get(j, [])
        got, accepted = [], 0
        while accepted < per or len(got) < len(want):
            m = await c.next(timeout=30)
            if m["type"] == "accepted":
                accepted += 1
            else:
                assert m["type"] == "message", m
                got.append(m)
        assert len({m["id"] for m in got}) == len(got)
        assert sorted(m["message"] for m in got) == sorted("d%d #%d" % w for w in want)
        for i in {s for s, _ in want}:
            mine = [int(m["message"].split("#")[1]) for m in got
                    if m["sender"] == "d%d" % i]
            assert mine == sorted(mine), (i, j, mine)
    for c in devices:
        assert [m for m in await c.sync() if m.get("type") == "message"] == []


@pytest.mark.slow
@ensure
async def test_store_restart_nodes_are_live_again_after(chatd, clients, own_redis):
    """The store (appendonly) is stopped and started again under two nodes:
    presence, subscriptions and pushes work again once it is back, and the
    bound connections stay bound."""
    a = await chatd(target=own_redis.target, redis_timeout=1.0)
    b = await chatd(target=own_redis.target, redis_timeout=1.0)
    bob = await clients(b)
    await bob.register("bob")
    alice = await clients(a)
    await alice.register("alice")
    alice.send({"message": "before", "receiver": "bob"})
    await alice.expect("accepted")
    await bob.expect("message", message="before")
    subscribed = b.service.presence.notifications.subscriber._connections
    own_redis.stop()
    own_redis.start()
    await own_redis.await_ready()
    await wait_until(lambda: b.service.presence.notifications.subscriber._connections > subscribed
                     and b.service.presence.notifications.subscriber.connected, timeout=15)
    # sends may meet the store still reconnecting: retry with the same ref
    for tries in range(40):
        alice.send({"message": "after", "receiver": "bob", "ref": "after"})
        r = await alice.next()
        if r["type"] == "accepted":
            break
        assert r["code"] == "unavailable", r
        await pass_time(0.25)
    await bob.expect("message", message="after", timeout=15)
    assert own_redis.command("GET", "chatd:{bob}:node").split()[0].decode() == b.hub.node_id


@ensure
async def test_a_stuck_subscriber_connection_is_cut_and_made_again(chatd, clients, redis):
    """The subscriber PINGs; when the store does not answer within the
    deadline (here: CLIENT PAUSE) the connection is cut and made again,
    and pushes are live once the store answers."""
    a = await chatd(redis_timeout=0.5)
    b = await chatd(redis_timeout=0.5)
    bob = await clients(b)
    await bob.register("bob")
    alice = await clients(a)
    await alice.register("alice")
    sub = b.service.presence.notifications.subscriber
    before = sub._connections
    redis.command("CLIENT", "PAUSE", "2500", "ALL")
    try:
        await wait_until(lambda: sub._connections > before, timeout=15,
                         what="the subscriber reconnecting")
    finally:
        redis.command("CLIENT", "UNPAUSE")
    for tries in range(40):
        alice.send({"message": "after the pause", "receiver": "bob", "ref": "p"})
        r = await alice.next()
        if r["type"] == "accepted":
            break
        await pass_time(0.25)
    await bob.expect("message", message="after the pause")
