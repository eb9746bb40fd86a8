"""chatd-client --push APP:PUSHKEY: registers for wake-ups once connected
(the real client as a subprocess, a real node, store and gateway)."""

import pytest_twisted

from chatd.client import cli
from tests.helpers import wait_until

ensure = pytest_twisted.ensureDeferred


def test_push_option_parses():
    o = cli.parse_args(["h", "1", "--id", "a", "--push", "com.example.ios:ab:cd"])
    assert o.push == ("com.example.ios", "ab:cd")
    for bad in ("nocolon", "bad app:x", "com.x:"):
        try:
            cli.parse_args(["h", "1", "--push", bad])
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(bad)


@ensure
async def test_client_registers_its_pushkey(chatd, clients, client, redis, gateway):
    node = await chatd(push_url=gateway.url, push_interval=1.0)
    bob = client(node.port, "--id", "bob", "--listen", "--push", "com.example.ios:PK-bob")
    await bob.wait_for("push wake-ups: registered for app com.example.ios", stream="err")
    assert redis.command("HGET", "chatd:{bob}:push", "key") == b"PK-bob"
    bob.transport.signalProcess("INT")
    assert await bob.exited() == 0
    await wait_until(lambda: redis.command("EXISTS", "chatd:{bob}:node") == 0)
    alice = await clients(node)
    await alice.register("alice")
    alice.send({"message": "wake", "receiver": "bob"})
    await alice.expect("accepted")
    req = await gateway.next()
    assert req.pushkey == "PK-bob" and req.notification["devices"][0]["app_id"] == \
        "com.example.ios"
