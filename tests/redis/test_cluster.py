"""
chatd on a real Valkey Cluster (3 primaries, one replica each; see
tests/fixtures/cluster.py): slot routing, sharded pub/sub per primary, a slot
migrated under traffic, a primary killed, and the start error of a cluster
that leaves slots uncovered. One cluster for the module (starting one takes
a few seconds); every test uses device names of its own.
"""

import os
import time

import pytest
import pytest_twisted

from chatd.redis.cluster import slot_of
from chatd.store import layout
from tests.fixtures.cluster import ValkeyCluster, wait_replicated
from tests.fixtures.nodes import ChatdNodes, ChatdProcess
from tests.helpers import wait_until

ensure = pytest_twisted.ensureDeferred

LEASE = 2.0


def test_cluster_urls():
    """redis+cluster:// and rediss+cluster:// with several seeds; a URL a
    person can fix is refused naming the option."""
    from chatd.redis.target import parse_redis_url
    t = parse_redis_url("redis+cluster://:pw@10.0.0.5:7000,10.0.0.6:7001")
    assert (t.kind, t.seeds, t.password, t.tls) == (
        "cluster", (("10.0.0.5", 7000), ("10.0.0.6", 7001)), "pw", False)
    assert t.describe() == "redis+cluster://10.0.0.5:7000,10.0.0.6:7001"  # no password
    assert parse_redis_url("rediss+cluster://h:7000").tls
    for bad, why in (("redis+cluster://h", "'h' is not host:port"),
                     ("redis+cluster://h:7000,", "'' is not host:port"),
                     ("redis+cluster://h:7000/2", "a cluster has only database 0")):
        with pytest.raises(ValueError) as e:
            parse_redis_url(bad)
        assert str(e.value).startswith("--redis: ") and why in str(e.value), str(e.value)


@pytest.fixture
def nodes(cluster, tmp_short):
    """Start chatd processes on the cluster: ``await nodes(n, *args)``."""
    started = ChatdNodes(tmp_short, "--redis", cluster.url, "--rate-limit", "0",
                         "--presence-lease", "%gs" % LEASE)
    yield started.start
    started.finish()


@pytest.mark.slow
@ensure
async def test_devices_on_all_three_primaries_talk_through_two_nodes(cluster, nodes, opened):
    """Six devices, two on each primary's slots, bound alternately on two
    chatd nodes: every message reaches its receiver live (across nodes
    through the receiver's shard's pub/sub), in order per sender, and is
    stored on the primary that owns the receiver's slot."""
    a, b = await nodes(2)
    names = [d for per in cluster.devices_on_each_primary("talk", 2) for d in per]
    conns, tokens = {}, {}
    for i, name in enumerate(names):
        conns[name] = await opened(a if i % 2 == 0 else b)
        tokens[name] = await conns[name].register(name)
    for sender in names:
        for receiver in names:
            if receiver != sender:
                for k in range(3):
                    conns[sender].send({"message": "%s>%s %d" % (sender, receiver, k),
                                        "receiver": receiver})
    n = 3 * (len(names) - 1)  # each sends n and gets n
    for name in names:
        lines = [await conns[name].next() for _ in range(2 * n)]
        assert [m["type"] for m in lines].count("accepted") == n, lines
        got = [m for m in lines if m["type"] == "message"]
        for sender in names:
            if sender != name:
                mine = [m["message"] for m in got if m["sender"] == sender]
                assert mine == ["%s>%s %d" % (sender, name, k) for k in range(3)]
        conns[name].send({"ack": max(m["id"] for m in got)})
    for receiver in names:  # the acks took the inbox on the owner's primary
        await wait_until(lambda r=receiver: cluster.command(
            r, "LLEN", "chatd:{%s}:inbox" % r) == 0, what="%s's inbox acked" % receiver)
        assert cluster.command(receiver, "GET", "chatd:{%s}:seq" % receiver) == b"15"

    # offline storage on the receiver's primary; reconnect on the other node
    receiver, sender = names[1], names[0]   # on node B, and on node A
    await conns[receiver].close()
    for k in range(4):
        conns[sender].send({"message": "offline %d" % k, "receiver": receiver, "ref": k})
        await conns[sender].expect("accepted", ref=k)
    assert cluster.command(receiver, "LLEN", "chatd:{%s}:inbox" % receiver) == 4
    again = await opened(a)
    r = await again.reconnect(receiver, tokens[receiver])
    assert r["pending"] == 4
    assert [(await again.expect("message"))["message"] for _ in range(4)] == \
        ["offline %d" % k for k in range(4)]
    conns[sender].send({"message": "live again", "receiver": receiver})
    await again.expect("message", message="live again")


async def send_all(client, receiver, count, window=16, timeout=30, order=None, base=0):
    """Send ``m0``..``m<count-1>`` to ``receiver`` with refs, ``window`` in
    flight; a send answered ``unavailable`` is sent again with that one and
    every one written after it (as chatd-client does). Returns the ids in the
    order their first ``accepted`` came."""
    order = [] if order is None else order
    first = {}
    todo = list(range(base, base + count))
    give_up = time.monotonic() + 120
    while todo:
        assert time.monotonic() < give_up, "never accepted: %r" % todo
        batch, todo = todo, []
        inflight = []
        for k in batch:
            client.send({"message": "m%d" % k, "receiver": receiver, "ref": k})
            inflight.append(k)
            if len(inflight) >= window:
                k0 = inflight.pop(0)
                r = await client.next(timeout)
                todo += _settle(r, k0, first, order, todo)
        for k0 in inflight:
            r = await client.next(timeout)
            todo += _settle(r, k0, first, order, todo)
        todo = sorted(set(todo))
    return order, first


def _settle(reply, ref, first, order, todo):
    assert reply.get("ref") == ref, reply
    if reply["type"] == "accepted":
        if ref not in first:
            first[ref] = reply["id"]
            order.append(reply["id"])
        else:
            assert first[ref] == reply["id"]  # a retry answered from the ref record
        return []
    assert reply.get("code") == "unavailable", reply
    return [ref]


async def receive_all(client, count, timeout=30):
    """``count`` distinct messages, acking as they come: [(id, text)]."""
    got = []
    while len({i for i, _ in got}) < count:
        m = await client.expect("message", timeout)
        got.append((m["id"], m["message"]))
        client.send({"ack": m["id"]})
    return got


@pytest.mark.slow
@ensure
async def test_a_slot_migrated_under_traffic_loses_nothing(cluster, opened):
    """A receiver's slot moves to another primary (SETSLOT IMPORTING /
    MIGRATING, MIGRATE, SETSLOT NODE) while a sender on another node
    streams messages to it: the clients meet ASK and MOVED on the way (the
    counters say so), nothing is lost or stored twice, the receiver gets
    every message live (its channel followed the slot) in the order they
    were accepted."""
    from twisted.internet import defer, threads

    from tests.fixtures.nodes import start_node
    a = await start_node(cluster.target, redis_timeout=5.0, presence_lease=LEASE)
    b = await start_node(cluster.target, redis_timeout=5.0, presence_lease=LEASE)
    try:
        [[bob], [alice], _] = cluster.devices_on_each_primary("mig", 1)
        sender = await opened(a.port)
        await sender.register(alice)
        receiver = await opened(b.port)
        await receiver.register(bob)
        source = cluster.owner(bob)
        dest = cluster.primaries[(cluster.primaries.index(source) + 1) % 3]
        slot = slot_of(b"{%s}" % bob.encode())
        stats = a.service.client.stats
        count = 300
        progress = []
        sending = defer.ensureDeferred(send_all(sender, bob, count, order=progress))
        receiving = defer.ensureDeferred(receive_all(receiver, count))
        await wait_until(lambda: len(progress) > 30, what="traffic flowing")

        def asked():  # (a thread's wait) the sender met an ASK
            from tests.fixtures.process import wait_for
            wait_for(lambda: stats.redirects.get("ASK"), 30, "an ASK redirection")

        await threads.deferToThread(cluster.migrate_slot, slot, source, dest, asked)
        order, first = await sending
        got = await receiving
        assert cluster.owner(bob) is dest
        ids = [i for i, _ in got]
        assert len(ids) == len(set(ids)) == count  # none twice on one connection
        assert ids == order  # in the order they were accepted
        assert sorted(t for _, t in got) == sorted("m%d" % k for k in range(count))
        assert {first[int(t[1:])] for i, t in got} == set(ids)
        # live after the move: the receiver's channel followed its slot
        sender.send({"message": "after", "receiver": bob})
        await sender.expect("accepted")
        await receiver.expect("message", message="after")
        assert dest.command("EXISTS", "chatd:{%s}:token" % bob) == 1
        # the sender's node met both redirections (the receiver's acks too)
        seen = b.service.client.stats.redirects
        assert stats.redirects.get("ASK"), stats.redirects
        assert stats.redirects.get("MOVED") or seen.get("MOVED"), (stats.redirects, seen)
    finally:
        await a.stop()
        await b.stop()


@ensure
async def test_calls_of_one_slot_keep_their_order_through_a_migration(cluster):
    """The store client alone, on a stream of RPUSHes to one key (many in
    flight at any time) while the key's slot migrates: the calls that meet
    ASK and MOVED are sent again before any later call of that slot, so the
    list holds every number once, in call order."""
    from twisted.internet import reactor, task, threads

    from chatd.redis.cluster import ClusterClient
    from tests.fixtures.process import wait_for
    client = ClusterClient(cluster.target, 10.0, reactor).connect()
    try:
        assert await client.when_connected(10)
        [[device], _, _] = cluster.devices_on_each_primary("order", 1)
        key = b"chatd:{%s}:list" % device.encode()
        source = cluster.owner(device)
        dest = cluster.primaries[(cluster.primaries.index(source) + 2) % 3]
        results, made = [], [0]

        def pump():
            for _ in range(40):
                client.call(b"RPUSH", key, b"%d" % made[0]).addBoth(results.append)
                made[0] += 1

        loop = task.LoopingCall(pump)
        loop.clock = reactor
        loop.start(0.001)
        await wait_until(lambda: len(results) > 1000, what="calls answered")
        redirects = client.stats.redirects

        def asked():
            wait_for(lambda: redirects.get("ASK"), 30, "an ASK redirection")

        await threads.deferToThread(cluster.migrate_slot, slot_of(key), source, dest, asked)
        await wait_until(lambda: redirects.get("MOVED"), what="a MOVED redirection")
        loop.stop()
        await wait_until(lambda: len(results) == made[0], timeout=30, what="every reply")
        assert [r for r in results if not isinstance(r, int)] == []
        assert dest.command("LRANGE", key, 0, -1) == [b"%d" % i for i in range(made[0])]
    finally:
        await client.close()


def test_a_cluster_with_uncovered_slots_is_a_clean_start_error(tmp_short):
    """A cluster node that owns only some slots: chatd refuses to start with
    one line that names --redis and the slots, and no traceback."""
    from tests.fixtures.valkey import ValkeyServer
    node = ValkeyServer(os.path.join(tmp_short, "lone"), cluster=True, node_timeout_ms=2000).start()
    proc = ChatdProcess(tmp_short, ["--port", "tcp:0:interface=127.0.0.1", "--redis",
                                    "redis+cluster://127.0.0.1:%d" % node.port])
    try:
        from tests.fixtures.process import wait_for
        wait_for(node.answers, 30, "the cluster node answering", 0.05)
        node.command("CLUSTER", "ADDSLOTSRANGE", 0, 9999)
        proc.start()
        proc.wait(60)
        log = proc.log()
        assert "could not start: --redis redis+cluster://127.0.0.1:%d: the cluster leaves " \
               "6384 of the 16384 slots without a node (10000-16383)" % node.port in log, log
        assert "listening" not in log and proc.bad_log_lines() == [], log
    finally:
        proc.cleanup()
        node.cleanup()


def _has_store_acks():
    from chatd.app.tap import Options
    return any(o[0] == "store-acks" for o in Options.optParameters)


async def _fail_over_under_traffic(cluster, nodes, opened, failover, extra, in_sync):
    a, b = await nodes(2, "--redis-timeout", "2s", *extra)
    [[bob], [alice], [carol]] = cluster.devices_on_each_primary("fo%d" % len(extra), 1)
    sender = await opened(a)
    await sender.register(alice)
    await (await opened(b)).register(carol)
    receiver = await opened(b)
    token = await receiver.register(bob)
    before, first = await send_all(sender, bob, 50)
    got = [(await receiver.expect("message"))["id"] for _ in range(50)]
    assert got == before
    primary = cluster.owner(bob)
    if in_sync:
        wait_replicated(primary, cluster.replica_of(primary))
    failover.kill(primary)
    if in_sync:
        # the other primaries mark it failed: the cluster is down (CLUSTERDOWN
        # on every slot), and a send to a device of a healthy primary is
        # retried until its deadline, then answered 'unavailable'
        healthy = cluster.owner(carol)
        await wait_until(lambda: b"cluster_state:fail" in healthy.command("CLUSTER", "INFO"),
                         timeout=30, what="the cluster marking the primary failed")
        sender.send({"message": "while down", "receiver": carol, "ref": "down"})
        await sender.expect("error", timeout=30, code="unavailable", ref="down")
    failover.take_over()
    if "--store-acks" in extra:
        # no write is confirmed until the new primary has a replica again
        failover.restart_old()
    after, _ = await send_all(sender, bob, 50, timeout=60, base=50)
    return sender, receiver, token, before, after, b


@pytest.mark.slow
@ensure
async def test_sigkill_of_a_primary_then_takeover(cluster, nodes, opened, failover):
    """The primary holding a receiver's slot is SIGKILLed (its replica had
    every write) and the replica takes over: sends meet 'unavailable' for a
    while, then go on; the receiver, still connected to its node, gets
    every message accepted after the takeover, live and in order (its
    channel moved to the new primary), and a reconnect finds every
    unacked one."""
    sender, receiver, token, before, after, b = await _fail_over_under_traffic(
        cluster, nodes, opened, failover, (), in_sync=True)
    got = [(await receiver.expect("message", timeout=30))["id"] for _ in range(len(after))]
    assert got == after
    live, _ = await send_all(sender, receiver.device, 1, base=100)  # long after: no catch-up
    assert (await receiver.expect("message"))["id"] == live[0]
    await receiver.close()
    again = await opened(b)
    r = await again.reconnect(receiver.device, token)
    assert r["pending"] == 101  # nothing was acked; the replica had it all
    ids = [(await again.expect("message"))["id"] for _ in range(101)]
    assert ids == before + after + live


@pytest.mark.slow
@pytest.mark.skipif(not _has_store_acks(), reason="needs --store-acks (lead's branch)")
@ensure
async def test_sigkill_of_a_primary_with_store_acks_loses_nothing_accepted(
        cluster, nodes, opened, failover):
    """With --store-acks 1 the primary may die at any moment (its replica
    not waited for): every message that got 'accepted' is delivered, in
    order."""
    sender, receiver, token, before, after, b = await _fail_over_under_traffic(
        cluster, nodes, opened, failover, ("--store-acks", "1"), in_sync=False)
    await receiver.close()
    again = await opened(b)
    r = await again.reconnect(receiver.device, token)
    assert r["pending"] == 100
    pushes = [await again.expect("message") for _ in range(100)]
    ids = [p["id"] for p in pushes]
    # every accepted one, once, in id order; the order they were first
    # *answered* in may differ: a write not confirmed in time is answered
    # 'unavailable', and its retry (same ref) is answered from the first
    # after later ones were accepted
    assert ids == sorted(before + after) and len(set(ids)) == 100
    assert sorted(p["message"] for p in pushes) == sorted("m%d" % k for k in range(100))


@pytest.mark.slow
@ensure
async def test_chatd_admin_on_a_cluster(cluster, nodes, opened):
    """chatd-admin with a redis+cluster:// URL: stats count devices of every
    primary, and revoke reaches the node holding the device (its SPUBLISH
    goes to the shard of the device's channel)."""
    import subprocess
    import sys

    from tests.fixtures.nodes import ROOT
    [a] = await nodes(1)
    names = [d for per in cluster.devices_on_each_primary("adm", 1) for d in per]
    conns = {}
    for name in names:
        conns[name] = await opened(a)
        await conns[name].register(name)

    def admin(*args):
        p = subprocess.run([sys.executable, "-m", "chatd.ops.admin", "--redis", cluster.url,
                            "--json"] + list(args), cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, p.stderr
        import json
        return json.loads(p.stdout)

    from twisted.internet import threads
    stats = await threads.deferToThread(admin, "stats")
    assert stats["registered"] >= 3 and stats["bound"], stats
    for name in names:
        told = await threads.deferToThread(admin, "revoke", name)
        assert told["nodes_told"] == 1, told
        await conns[name].error("revoked")


@pytest.mark.slow
@ensure
async def test_chatd_started_before_its_cluster_serves_once_it_is_up(tmp_short, opened):
    """chatd starts while no node of the cluster answers (it says so, and
    listens): clients get 'unavailable', then, once the cluster is up (here
    one primary), chatd finds it through its seeds and serves."""
    small = ValkeyCluster(os.path.join(tmp_short, "late"), primaries=1, replicas=0)
    proc = ChatdProcess(tmp_short, ["--port", "tcp:0:interface=127.0.0.1", "--redis",
                                    small.url, "--redis-timeout", "1s"])
    try:
        await proc.start().await_listening()
        assert "is not answering yet" in proc.log()
        c = await opened(proc)
        c.send({"register": "true", "sender": "early"})
        await c.error("unavailable")
        from twisted.internet import threads
        await threads.deferToThread(small.start)
        for _ in range(60):  # a client retrying, as phones do
            c.send({"register": "true", "sender": "early"})
            reply = await c.next(timeout=30)
            if reply["type"] == "registered":
                break
            assert reply.get("code") == "unavailable", reply
        else:
            raise AssertionError("never registered")
        c.send({"message": "to myself", "receiver": "early"})
        got = [await c.next(), await c.next()]  # the push may come first
        assert sorted(m["type"] for m in got) == ["accepted", "message"], got
    finally:
        proc.stop()
        proc.cleanup()
        small.cleanup()
    assert proc.bad_log_lines() == [], proc.log()[-3000:]


@pytest.mark.slow
@ensure
async def test_a_sigkilled_nodes_records_are_reaped_on_every_primary(cluster, nodes, opened):
    """chatd.hub.presence on a Cluster: node A holds devices whose records
    are on all three primaries, and is SIGKILLed. Its heartbeat runs out
    (LEASE), and node B deletes every record of A's, on every primary (one
    SCAN each), long before the records' own expiry (60 leases)."""
    a, b = await nodes(2)
    names = [d for per in cluster.devices_on_each_primary("reaped", 2) for d in per]
    for name in names:
        c = await opened(a)
        await c.register(name)
    a_id = cluster.command(names[0], "GET", "chatd:{%s}:node" % names[0]).split()[0]
    assert cluster.command(names[0], "PTTL", "chatd:{%s}:node" % names[0]) > 10 * LEASE * 1000
    a.proc.kill()
    a.proc.wait()
    for name in names:
        await wait_until(lambda n=name: cluster.command(n, "EXISTS", "chatd:{%s}:node" % n) == 0,
                         timeout=LEASE * 10, what="%s's record reaped" % name)
    # ("nodes": the owner of the {nodes} hash tag's slot)
    await wait_until(lambda: a_id not in cluster.command("nodes", "SMEMBERS", "chatd:{nodes}"),
                     what="the dead node forgotten")
    # node B says so, once the reap is over (after the SREM just seen); with
    # A alone, or with other dead nodes of this module's earlier tests, and
    # in one reap or, if a SCAN step failed under load, in its retry
    await wait_until(lambda: any("presence record(s) deleted" in line and a_id.decode() in line
                                 for line in b.log().splitlines() if "dead node(s)" in line),
                     what="node B's log of the reap of A's records")


@pytest.mark.slow
@ensure
async def test_inboxes_left_without_a_ttl_are_given_one_on_every_primary(cluster, nodes, opened):
    """chatd.hub.sweeper.InboxSweeper on a Cluster: an inbox made by one
    message has no TTL (chatd/store/layout.py "inbox"); the node's inbox
    sweeper finds such inboxes on every primary (a SCAN step each) and gives
    each the TTL of its newest message (inbox_ttl.lua, per slot)."""
    (a,) = await nodes(1, "--inbox-sweep", "0.1s")
    names = [d for per in cluster.devices_on_each_primary("swept", 1) for d in per]
    for name in names:
        c = await opened(a)
        await c.register(name)
        await c.close()
    sender = await opened(a)
    await sender.register("sweeper-sender")
    for name in names:
        sender.send({"message": "hello %s" % name, "receiver": name})
        await sender.expect("accepted")
    for name in names:
        inbox = "chatd:{%s}:inbox" % name
        await wait_until(lambda i=inbox, n=name: cluster.command(n, "PEXPIRETIME", i) > 0,
                         what="%s's inbox given its TTL" % name)
        line = cluster.command(name, "LINDEX", inbox, 0)
        assert cluster.command(name, "PEXPIRETIME", inbox) == \
            layout.entry_sent_at(line) + 30 * 86400 * 1000
