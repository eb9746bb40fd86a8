"""
chatd on a real Valkey Cluster (3 primaries, one replica each; see
tests/stores.py): slot routing, sharded pub/sub per primary, a slot
migrated under traffic, a primary killed, and the start error of a cluster
that leaves slots uncovered. One cluster for the module (starting one takes
a few seconds); every test uses device names of its own.
"""

import os
import signal
import tempfile
import shutil

import pytest
import pytest_twisted

from chatd.cluster import slot_of
from tests.helpers import connect, wait_until
from tests.procs import ChatdProcess
from tests.stores import ValkeyCluster, wait_replicated

ensure = pytest_twisted.ensureDeferred

LEASE = 2.0


@pytest.fixture(scope="module")
def cluster():
    tmp = tempfile.mkdtemp(prefix="chatd-cl-")
    c = ValkeyCluster(tmp)
    try:
        c.start()
        yield c
    finally:
        c.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def nodes(cluster, tmp_short):
    """Start chatd processes on the cluster: ``await nodes(n, *args)``."""
    procs = []

    async def start(n, *extra):
        for i in range(n):
            p = ChatdProcess(tmp_short, ["--port", "tcp:0:interface=127.0.0.1",
                                         "--redis", cluster.url, "--rate-limit", "0",
                                         "--presence-lease", "%gs" % LEASE, *extra],
                             log_path=os.path.join(tmp_short, "node%d.log" % len(procs)))
            procs.append(p.start())
        for p in procs[-n:]:
            await p.await_listening()
        return procs[-n:]

    yield start
    for p in procs:
        try:
            p.stop()
        except AssertionError:
            pass
        finally:
            p.cleanup()
    for p in procs:
        assert p.bad_log_lines() == [], p.log()[-3000:]


@pytest_twisted.async_yield_fixture
async def opened():
    conns = []

    async def open_(proc_or_port):
        port = proc_or_port if isinstance(proc_or_port, int) else proc_or_port.port
        c = await connect(port)
        conns.append(c)
        return c

    yield open_
    for c in conns:
        await c.close()


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
