"""
Delivery and read receipts (contract 1.2, "receipts opt-in", "read", the
Receipt push), on one node and one real store: the opt-in, one receipt per
sender per ack, the offline sender (stored, pending, reconnect), superseding,
upto never going down, read and its errors, --receipts off, a 1.0 client.
(Several nodes and Redis Cluster: tests/hub/test_receipts_nodes.py.)
"""

import json
import re

import pytest_twisted

from tests.helpers import wait_until

ensure = pytest_twisted.ensureDeferred

ON = {"receipts": "true"}
RECEIPT_LINE = re.compile(
    r'^\{"type":"receipt","id":"\d{16}","receiver":"[^"]+","status":"(delivered|read)",'
    r'"upto":"\d{16}","at":\d+\}$')


async def send_all(client, receiver, texts):
    for t in texts:
        client.send({"message": t, "receiver": receiver})
    return [(await client.expect("accepted"))["id"] for _ in texts]


async def quiet(client):
    """Every line before a ping's pong (nothing unasked: [])."""
    return await client.sync()


def inbox(redis, device):
    return [json.loads(e) for e in redis.command("LRANGE", "chatd:{%s}:inbox" % device, 0, -1)]


@ensure
async def test_an_ack_makes_one_delivered_receipt_per_sender(chatd, clients, redis):
    node = await chatd()
    alice, carol, bob = await clients(node), await clients(node), await clients(node)
    await alice.register("alice", **ON)
    await carol.register("carol", **ON)
    await bob.register("bob")
    a_ids = await send_all(alice, "bob", ["a1", "a2", "a3"])
    c_ids = await send_all(carol, "bob", ["c1"])
    pushed = [await bob.expect("message") for _ in range(4)]
    bob.send({"ack": pushed[-1]["id"]})
    raw = []
    alice.proto.lineReceived = _recording(alice, raw)
    r = await alice.expect("receipt", receiver="bob", status="delivered", upto=a_ids[-1])
    assert list(r) == ["type", "id", "receiver", "status", "upto", "at"]
    assert isinstance(r["at"], int) and r["id"] == "%016d" % 1  # alice's sequence
    assert RECEIPT_LINE.match(raw[0].decode()), raw
    rc = await carol.expect("receipt", receiver="bob", status="delivered", upto=c_ids[0])
    assert await quiet(alice) == [] and await quiet(carol) == []
    # bob, who did not opt in, gets nothing; and no receipt for acking a receipt
    assert await quiet(bob) == []
    alice.send({"ack": r["id"]})
    carol.send({"ack": rc["id"]})
    await wait_until(lambda: not redis.command("LLEN", "chatd:{alice}:inbox"))
    assert await quiet(bob) == [] and await quiet(alice) == []


def _recording(client, raw):
    original = client.proto.lineReceived

    def line(data):
        raw.append(data)
        original(data)
    return line


@ensure
async def test_the_offline_sender_finds_its_receipt_stored_pending_and_pushed(
        chatd, clients, redis):
    node = await chatd()
    alice, bob = await clients(node), await clients(node)
    token = await alice.register("alice", **ON)
    await bob.register("bob")
    ids = await send_all(alice, "bob", ["hi %d" % i for i in range(5)])
    await alice.close()
    for _ in ids:
        await bob.expect("message")
    bob.send({"ack": ids[-1]})
    await wait_until(lambda: redis.command("LLEN", "chatd:{alice}:inbox") == 1,
                     what="the receipt stored in alice's inbox")
    stored = inbox(redis, "alice")[0]
    assert stored["type"] == "receipt" and stored["upto"] == ids[-1]
    alice = await clients(node)
    reply = await alice.reconnect("alice", token, **ON)
    assert reply["pending"] == 1
    r = await alice.expect("receipt", status="delivered", receiver="bob", upto=ids[-1])
    assert r == stored
    # redelivered until acked: the next connection gets it again, same id
    await alice.close()
    alice = await clients(node)
    reply = await alice.reconnect("alice", reply["token"], **ON)
    assert reply["pending"] == 1
    assert (await alice.expect("receipt")) == stored
    alice.send({"ack": r["id"]})
    await wait_until(lambda: not redis.command("LLEN", "chatd:{alice}:inbox"))


@ensure
async def test_a_thousand_messages_one_ack_one_receipt(chatd, clients, redis):
    node = await chatd(rate_limit=0)
    alice, bob = await clients(node), await clients(node)
    token = await alice.register("alice", **ON)
    await bob.register("bob")
    await alice.close()
    one_shot = await clients(node)
    for i in range(1000):
        one_shot.send({"message": "m %d" % i, "receiver": "bob", "sender": "alice",
                       "token": token})
    ids = [(await one_shot.expect("accepted"))["id"] for _ in range(1000)]
    for _ in ids:
        await bob.expect("message")
    bob.send({"ack": ids[-1]})
    await wait_until(lambda: not redis.command("LLEN", "chatd:{bob}:inbox"))
    await wait_until(lambda: redis.command("LLEN", "chatd:{alice}:inbox") == 1)
    assert inbox(redis, "alice")[0]["upto"] == ids[-1]


@ensure
async def test_an_offline_sender_holds_few_receipts_and_upto_only_grows(
        chatd, clients, redis):
    node = await chatd(rate_limit=0)
    alice, bob = await clients(node), await clients(node)
    token = await alice.register("alice", **ON)
    await bob.register("bob")
    ids = await send_all(alice, "bob", ["m %d" % i for i in range(64)])
    await alice.close()
    for i, _ in enumerate(ids):
        pushed = await bob.expect("message")
        if i % 4 == 3:
            bob.send({"ack": pushed["id"]})  # 16 acks
    await wait_until(lambda: not redis.command("LLEN", "chatd:{bob}:inbox"))
    # reads: the last one, then an older one (upto must not go down)
    bob.send({"read": ids[-1], "from": "alice"})
    bob.send({"read": ids[10], "from": "alice"})
    assert await quiet(bob) == []
    stored = inbox(redis, "alice")
    assert [(r["status"], r["upto"]) for r in stored] == [
        ("delivered", ids[-1]), ("read", ids[-1])], stored
    alice = await clients(node)
    reply = await alice.reconnect("alice", token, **ON)
    assert reply["pending"] == 2
    got = [await alice.expect("receipt") for _ in range(2)]
    assert got == stored
    # pushed once on a live connection: a newer read makes a new receipt
    # (a new id); an older one makes none
    bob.send({"read": ids[5], "from": "alice"})
    assert await quiet(bob) == []
    assert await quiet(alice) == []


@ensure
async def test_read_rules_and_errors(chatd, clients, redis):
    node = await chatd()
    alice, bob = await clients(node), await clients(node)
    await alice.register("alice", **ON)
    await bob.register("bob")
    ids = await send_all(alice, "bob", ["one", "two"])
    for _ in ids:
        await bob.expect("message")
    bob.send({"read": ids[0], "from": "alice"})
    r = await alice.expect("receipt", status="read", receiver="bob", upto=ids[0])
    bob.send({"read": ids[1], "from": "alice", "ref": 7})
    await alice.expect("receipt", status="read", upto=ids[1])
    assert (await quiet(alice)) == [] and r
    # errors, in packet order
    bob.send({"read": "%016d" % 99, "from": "alice", "ref": "hi"})
    bob.send({"read": "x1", "from": "alice"})
    bob.send({"read": ids[0], "from": "not an id"})
    bob.send({"read": ids[0]})
    assert (await bob.error("bad_ack"))["ref"] == "hi"
    assert (await bob.error("bad_field"))["field"] == "read"
    assert (await bob.error("bad_field"))["field"] == "from"
    assert (await bob.error("missing_field"))["field"] == "from"
    # unbound
    stranger = await clients(node)
    stranger.send({"read": ids[0], "from": "alice"})
    await stranger.error("not_registered")
    # a read from a sender that did not opt in: nothing, no reply
    bob.send({"read": ids[0], "from": "carol"})
    assert await quiet(bob) == []


@ensure
async def test_a_read_costs_rate_budget(chatd, clients):
    node = await chatd(rate_limit=1, rate_burst=3)
    bob = await clients(node)
    await bob.register("bob")
    for _ in range(6):
        bob.send({"read": "0000000000000000", "from": "alice"})
    await bob.error("rate_limited")


@ensure
async def test_the_opt_in_holds_until_the_next_bind_and_a_1_0_client_sees_none(
        chatd, clients, redis):
    node = await chatd()
    alice, bob = await clients(node), await clients(node)
    token = await alice.register("alice", **ON)
    assert redis.command("GET", "chatd:{alice}:rcpt") == b"1"
    await bob.register("bob")
    # alice reconnects as a 1.0 client: off from now on
    await alice.close()
    alice = await clients(node)
    await alice.reconnect("alice", token)
    assert redis.command("GET", "chatd:{alice}:rcpt") is None
    ids = await send_all(alice, "bob", ["a"])
    await bob.expect("message")
    bob.send({"ack": ids[0]})
    bob.send({"read": ids[0], "from": "alice"})
    await wait_until(lambda: not redis.command("LLEN", "chatd:{bob}:inbox"))
    assert await quiet(bob) == [] and await quiet(alice) == []
    assert not redis.command("LLEN", "chatd:{alice}:inbox")


@ensure
async def test_receipts_off_makes_none_and_ignores_read(chatd, clients, redis):
    node = await chatd(receipts=False)
    alice, bob = await clients(node), await clients(node)
    await alice.register("alice", **ON)
    await bob.register("bob")
    ids = await send_all(alice, "bob", ["a"])
    await bob.expect("message")
    bob.send({"ack": ids[0]})
    bob.send({"read": "%016d" % 999, "from": "alice"})  # not even bad_ack
    await wait_until(lambda: not redis.command("LLEN", "chatd:{bob}:inbox"))
    assert await quiet(bob) == [] and await quiet(alice) == []
    assert not redis.command("LLEN", "chatd:{alice}:inbox")


TURNED = "chatd:rcpt:turned"


@ensure
async def test_only_opted_in_senders_are_named_and_the_opt_in_at_the_ack_decides(
        chatd, clients, redis):
    """The receiver's rs names the senders whose connection had opted in
    (an ack of the others reads none of their keys); what decides is still
    the opt-in at the ack: a sender who opted in after sending gets its
    receipt (the bind raised chatd:rcpt:turned), one who opted out none."""
    node = await chatd()
    redis.command("DEL", TURNED)  # the node's start covers nothing below
    alice, carol, bob = await clients(node), await clients(node), await clients(node)
    a_token = await alice.register("alice")
    c_token = await carol.register("carol", **ON)
    await bob.register("bob")
    a_ids = await send_all(alice, "bob", ["a1", "a2"])
    c_ids = await send_all(carol, "bob", ["c1"])
    assert redis.command("HGETALL", "chatd:{bob}:rs") == [b"carol", c_ids[0].encode()]
    assert redis.command("GET", TURNED) is None
    for _ in range(3):
        await bob.expect("message")
    # alice opts in (it had not), carol opts out, both after sending
    await alice.close()
    await carol.close()
    alice, carol = await clients(node), await clients(node)
    await alice.reconnect("alice", a_token, **ON)
    await carol.reconnect("carol", c_token)
    bob.send({"ack": c_ids[0]})
    await alice.expect("receipt", receiver="bob", status="delivered", upto=a_ids[1])
    await wait_until(lambda: not redis.command("LLEN", "chatd:{bob}:inbox"))
    assert await quiet(carol) == [] and not redis.command("LLEN", "chatd:{carol}:inbox")
    # rs still names carol (a field an ack covered costs nothing until rs grows)
    assert redis.command("HGETALL", "chatd:{bob}:rs") == [b"carol", c_ids[0].encode()]


@ensure
async def test_an_ack_of_senders_who_did_not_opt_in_names_and_makes_nothing(
        chatd, clients, redis):
    node = await chatd()
    redis.command("DEL", TURNED)
    alice, bob = await clients(node), await clients(node)
    await alice.register("alice")
    await bob.register("bob")
    ids = await send_all(alice, "bob", ["one", "two"])
    assert not redis.command("EXISTS", "chatd:{bob}:rs")
    for _ in ids:
        await bob.expect("message")
    bob.send({"ack": ids[-1]})
    await wait_until(lambda: not redis.command("LLEN", "chatd:{bob}:inbox"))
    assert await quiet(alice) == [] and not redis.command("LLEN", "chatd:{alice}:inbox")
    assert redis.command("GET", TURNED) is None

