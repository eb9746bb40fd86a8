"""
Push wake-ups (contract 1.2, "Push wake-ups"): when one is due, the exact
request, the gateway's answers (rejected, 5xx, other 4xx), coalescing, and
no wake-up for a bound device. Real nodes, a real store, and a real HTTP
gateway in the test process (tests/fixtures/gateway.py).
"""

import pytest_twisted

from tests.fixtures.gateway import away, message
from tests.helpers import wait_until

ensure = pytest_twisted.ensureDeferred

PUSH = dict(push_interval=1.0, push_unacked=0.5, push_timeout=1.0, push_retry_for=30.0)


def push_state(redis, device):
    raw = redis.command("HGETALL", "chatd:{%s}:push" % device)
    return {raw[i].decode(): raw[i + 1].decode() for i in range(0, len(raw), 2)}


@ensure
async def test_a_message_for_an_away_device_wakes_it(chatd, clients, redis, gateway):
    node = await chatd(push_url=gateway.url, **PUSH)
    await away(clients, node, "bob")
    alice, accepted = await message(clients, node, "bob", "secret text")
    req = await gateway.next()
    assert req.content_type == "application/json"
    assert req.body == {"notification": {
        "event_id": accepted["id"], "type": "chatd.message", "prio": "high",
        "counts": {"unread": 1},
        "devices": [{"app_id": "com.example.chat", "pushkey": "pk-0123456789abcdef",
                     "pushkey_ts": int(push_state(redis, "bob")["ts"]), "data": {}}]}}
    await wait_until(lambda: push_state(redis, "bob").get("res") == "sent")
    assert node.service.waker.stats.results["sent"] == 1


@ensure
async def test_content_sender_and_full(chatd, clients, redis, gateway):
    node = await chatd(push_url=gateway.url, push_content="full", **PUSH)
    await away(clients, node, "bob")
    alice, _ = await message(clients, node, "bob", "hello bob")
    n = (await gateway.next()).notification
    assert n["sender"] == "alice" and n["content"] == {"body": "hello bob"}


@ensure
async def test_no_wakeup_without_registration_or_when_bound(chatd, clients, redis, gateway):
    node = await chatd(push_url=gateway.url, **PUSH)
    alice = await clients(node)
    await alice.register("alice")
    plain = await clients(node)
    await plain.register("carol")  # no push registration
    await plain.close()
    bob = await clients(node)
    await bob.register("bob")
    bob.send({"push": "pk-bob", "app": "com.x"})
    await bob.expect("push_set")
    for receiver in ("carol", "bob"):
        alice.send({"message": "hi", "receiver": receiver})
        await alice.expect("accepted")
    msg = await bob.expect("message")
    bob.send({"ack": msg["id"]})  # acked within --push-unacked: no wake-up
    await gateway.none_within(PUSH["push_unacked"] + 1.5)


@ensure
async def test_unacked_on_a_bound_connection_wakes_it(chatd, clients, redis, gateway):
    node = await chatd(push_url=gateway.url, **PUSH)
    alice = await clients(node)
    await alice.register("alice")
    bob = await clients(node)
    await bob.register("bob")
    bob.send({"push": "pk-bob", "app": "com.x"})
    await bob.expect("push_set")
    alice.send({"message": "hi", "receiver": "bob"})
    await alice.expect("accepted")
    await bob.expect("message")  # never acked: a phone gone quiet
    req = await gateway.next()
    assert req.unread == 1 and req.pushkey == "pk-bob"


@ensure
async def test_rejected_removes_the_registration(chatd, clients, redis, gateway):
    gateway.mode = "reject"
    node = await chatd(push_url=gateway.url, **PUSH)
    await away(clients, node, "bob")
    alice, _ = await message(clients, node, "bob", "one")
    await gateway.next()
    await wait_until(lambda: push_state(redis, "bob") == {})
    assert node.service.waker.stats.results["rejected"] == 1
    alice.send({"message": "two", "receiver": "bob"})
    await alice.expect("accepted")
    await gateway.none_within(PUSH["push_interval"] + 1)


@ensure
async def test_503_is_retried_with_backoff_then_sent(chatd, clients, redis, gateway):
    gateway.mode = "503"
    node = await chatd(push_url=gateway.url, **PUSH)
    await away(clients, node, "bob")
    alice, _ = await message(clients, node, "bob", "one")
    first = await gateway.next()
    alice.send({"message": "two", "receiver": "bob"})  # keeps the back-off
    await alice.expect("accepted")
    second = await gateway.next()
    gateway.mode = "ok"
    third = await gateway.next()
    assert second.at - first.at >= 0.9          # about a second first
    assert third.at - second.at >= 1.9          # then doubling
    await wait_until(lambda: push_state(redis, "bob").get("res") == "sent")
    stats = node.service.waker.stats.results
    assert stats["retried"] == 2 and stats["sent"] == 1
    assert third.unread == 2


@ensure
async def test_other_4xx_is_not_retried(chatd, clients, redis, gateway):
    gateway.mode = "400"
    node = await chatd(push_url=gateway.url, **PUSH)
    await away(clients, node, "bob")
    alice, _ = await message(clients, node, "bob", "one")
    await gateway.next()
    await wait_until(lambda: push_state(redis, "bob").get("res") == "failed")
    await gateway.none_within(2.5)
    assert push_state(redis, "bob")["key"]  # kept: only `rejected` removes it


@ensure
async def test_hang_times_out_and_is_retried(chatd, clients, redis, gateway):
    gateway.mode = lambda req: "hang" if len(gateway.requests) == 1 else "ok"
    node = await chatd(push_url=gateway.url, **PUSH)
    await away(clients, node, "bob")
    alice, _ = await message(clients, node, "bob", "one")
    first = await gateway.next()
    second = await gateway.next()
    assert second.at - first.at >= PUSH["push_timeout"]
    await wait_until(lambda: push_state(redis, "bob").get("res") == "sent")


@ensure
async def test_retries_stop_after_retry_for(chatd, clients, redis, gateway):
    gateway.mode = "503"
    node = await chatd(push_url=gateway.url, **dict(PUSH, push_retry_for=1.5))
    await away(clients, node, "bob")
    alice, _ = await message(clients, node, "bob", "one")
    await wait_until(lambda: push_state(redis, "bob").get("res") == "dropped", 15)
    assert node.service.waker.stats.results["dropped"] == 1
    assert redis.command("ZCARD", "chatd:pushdue:{%s}" % _tag("bob")) == 0


@ensure
async def test_coalescing_one_more_per_interval_with_the_latest_count(
        chatd, clients, redis, gateway):
    node = await chatd(push_url=gateway.url, **dict(PUSH, push_interval=2.0))
    await away(clients, node, "bob")
    alice, _ = await message(clients, node, "bob", "m1")
    first = await gateway.next()
    assert first.unread == 1
    for i in range(2, 6):
        alice.send({"message": "m%d" % i, "receiver": "bob"})
        last = await alice.expect("accepted")
    second = await gateway.next()
    assert second.at - first.at >= 1.9
    assert second.unread == 5 and second.notification["event_id"] == last["id"]
    await gateway.none_within(2.5)  # nothing new: no third


@ensure
async def test_a_device_that_binds_before_its_wakeup_gets_none(chatd, clients, redis, gateway):
    node = await chatd(push_url=gateway.url,
                       **dict(PUSH, push_interval=2.0, push_unacked=30.0))
    token = await away(clients, node, "bob")
    alice, _ = await message(clients, node, "bob", "m1")
    await gateway.next()
    alice.send({"message": "m2", "receiver": "bob"})  # due again after the interval
    await alice.expect("accepted")
    bob = await clients(node)  # back before that: reconnects, is pushed both
    await bob.reconnect("bob", token)
    await bob.expect("message")
    last = await bob.expect("message")
    # bound, and not (yet) silent past --push-unacked: no wake-up, though
    # the interval ran out with both messages still unacked
    await gateway.none_within(3.0)
    bob.send({"ack": last["id"]})
    assert push_state(redis, "bob")["key"]  # a reconnect keeps the registration


def _tag(device):
    from chatd.store import layout
    return layout.shard_tag(layout.due_shard(device, layout.DUE_SHARDS)).decode()
