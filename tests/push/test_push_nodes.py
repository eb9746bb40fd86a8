"""
Wake-ups across nodes and stores: several chatd processes on one store, one
SIGKILLed in the middle of its gateway call (another node sends the
wake-up); a Redis Cluster; a gateway that is down for a while, then back.
"""

import re
import signal

import pytest
import pytest_twisted

from tests.fixtures.gateway import away, message
from tests.fixtures.nodes import ChatdNodes
from tests.helpers import wait_until

ensure = pytest_twisted.ensureDeferred

ARGS = ["--push-timeout", "2s", "--push-interval", "1s", "--push-unacked", "1s",
        "--presence-lease", "3s"]


def node_id(proc):
    return re.search(r"chatd node ([0-9a-f]+) starting", proc.log(since_start=True)).group(1)


@pytest.fixture
def nodes(own_redis, tmp_short):
    started = ChatdNodes(tmp_short, "--redis", own_redis.url)
    yield started.start
    started.finish()


@pytest.mark.slow
@ensure
async def test_sigkill_in_the_middle_of_the_gateway_call(nodes, opened, own_redis, gateway):
    gateway.mode = lambda req: "hang" if len(gateway.requests) == 1 else "ok"
    a, b = await nodes(2, "--push-url", gateway.url, *ARGS)
    await away(opened, a, "bob", "pk-bob-0123456789", "com.x")
    alice, accepted = await message(opened, a, "bob", "wake up")
    first = await gateway.next()
    sender = a if node_id(a) in first.headers["user-agent"] else b
    other = b if sender is a else a
    sender.kill(signal.SIGKILL)
    second = await gateway.next(timeout=15, what="the wake-up sent by the other node")
    assert node_id(other) in second.headers["user-agent"]
    assert second.notification["event_id"] == accepted["id"]
    assert second.pushkey == "pk-bob-0123456789"
    await wait_until(lambda: own_redis.command("HGET", "chatd:{bob}:push", "res") == b"sent")


@pytest.mark.slow
@ensure
async def test_a_node_killed_right_after_accepted_loses_no_wakeup(
        nodes, opened, own_redis, gateway):
    """The due entry is written with the message: the gateway down when the
    sending node dies, another node sends the wake-up once it is back."""
    gateway.mode = "503"
    a, b = await nodes(2, "--push-url", gateway.url, *ARGS)
    await away(opened, b, "bob", "pk-bob", "com.x")
    alice, _ = await message(opened, a, "bob", "wake up")
    a.kill(signal.SIGKILL)
    gateway.mode = "ok"
    while True:
        req = await gateway.next(timeout=15)
        if node_id(b) in req.headers["user-agent"]:
            break
    assert req.unread == 1


@ensure
async def test_gateway_down_then_back(chatd, clients, redis, gateway):
    from twisted.internet import reactor
    port = gateway.port.getHost().port
    site = gateway.port.factory
    url = gateway.url
    await gateway.port.stopListening()   # down: connections refused
    node = await chatd(push_url=url, push_interval=1.0, push_timeout=1.0,
                       push_retry_for=60.0)
    await away(clients, node, "bob", "pk-bob", "com.x")
    alice, _ = await message(clients, node, "bob", "m")
    waker = node.service.waker
    await wait_until(lambda: waker.stats.results["retried"] >= 2, 15, "two failed tries")
    gateway.port = reactor.listenTCP(port, site, interface="127.0.0.1")  # back
    req = await gateway.next(timeout=15)
    assert req.unread == 1
    await wait_until(lambda: redis.command("HGET", "chatd:{bob}:push", "res") == b"sent")


@pytest.mark.slow
@ensure
async def test_wakeups_on_a_redis_cluster(cluster, chatd, clients, gateway):
    node = await chatd(target=cluster.target, push_url=gateway.url, push_interval=1.0,
                       push_timeout=2.0)
    devices = ["bob", "carol", "dave", "erin"]  # spread over slots of the primaries
    for device in devices:
        c = await clients(node)
        await c.register(device)
        c.send({"push": "pk-" + device, "app": "com.x"})
        await c.expect("push_set")
        await c.close()
    alice = await clients(node)
    await alice.register("alice")
    for device in devices:
        alice.send({"message": "m", "receiver": device})
        await alice.expect("accepted")
    got = {(await gateway.next(timeout=15)).pushkey for _ in devices}
    assert got == {"pk-" + d for d in devices}


@pytest.mark.slow
@ensure
async def test_a_long_call_keeps_its_lease(chatd, clients, redis, gateway):
    """A gateway call longer than the claim's lease: the node renews it, so
    the other node does not send the wake-up a second time meanwhile."""
    from chatd.push.waker import LEASE
    gateway.mode = lambda req: "hang" if len(gateway.requests) == 1 else "ok"
    settings = dict(push_url=gateway.url, push_timeout=LEASE + 4, push_interval=1.0)
    a = await chatd(**settings)
    await chatd(**settings)
    await away(clients, a, "bob", "pk-bob", "com.x")
    alice, _ = await message(clients, a, "bob", "m")
    first = await gateway.next()
    second = await gateway.next(timeout=LEASE + 10)
    # the retry after the deadline, not another node's copy while it hung
    assert second.at - first.at >= LEASE + 4 - 0.1
    assert a.service.waker.stats.results["retried"] == 1
