"""
The push packet and its push_set reply (contract 1.2, "push"): validation,
storage with the device, and what keeps or removes it. Real nodes, a real
store.
"""

import pytest_twisted

from tests.helpers import run_admin

ensure = pytest_twisted.ensureDeferred


def stored(redis, device):
    raw = redis.command("HGETALL", "chatd:{%s}:push" % device)
    return {raw[i].decode(): raw[i + 1].decode() for i in range(0, len(raw), 2)}


@ensure
async def test_push_set_validation_and_storage(chatd, clients, redis):
    node = await chatd()
    c = await clients(node)
    c.send({"push": "abc", "app": "com.example.chat"})
    await c.error("not_registered")
    await c.register("bob")
    c.send({"push": "k" * 4097, "app": "com.x"})
    assert (await c.error("bad_field"))["field"] == "push"
    c.send({"push": 17, "app": "com.x"})
    assert (await c.error("bad_field"))["field"] == "push"
    c.send({"push": "abc"})
    assert (await c.error("missing_field"))["field"] == "app"
    c.send({"push": "abc", "app": "bad app!"})
    assert (await c.error("bad_field"))["field"] == "app"
    c.send({"push": "abc", "app": "a" * 65})
    assert (await c.error("bad_field"))["field"] == "app"
    assert stored(redis, "bob") == {}
    c.send({"push": "k" * 4096, "app": "com.example.chat"})
    assert await c.next() == {"type": "push_set", "app": "com.example.chat"}
    reg = stored(redis, "bob")
    assert reg["key"] == "k" * 4096 and reg["app"] == "com.example.chat"
    assert int(reg["ts"]) > 1.7e9
    # a new one replaces the old; "" removes it
    c.send({"push": "second", "app": "com.example.other"})
    await c.expect("push_set", app="com.example.other")
    assert stored(redis, "bob")["key"] == "second"
    c.send({"push": ""})
    assert await c.next() == {"type": "push_set", "app": None}
    assert stored(redis, "bob") == {}


@ensure
async def test_reconnect_keeps_register_drops(chatd, clients, redis):
    node = await chatd()
    c = await clients(node)
    token = await c.register("bob")
    c.send({"push": "pk1", "app": "com.x"})
    await c.expect("push_set", app="com.x")
    await c.close()
    c = await clients(node)
    await c.reconnect("bob", token)
    assert stored(redis, "bob")["key"] == "pk1"
    await c.close()
    c = await clients(node)
    await c.register("bob")
    assert stored(redis, "bob") == {}


@ensure
async def test_admin_revoke_and_purge_drop_it(chatd, clients, redis):
    node = await chatd()
    for device in ("bob", "carol"):
        c = await clients(node)
        await c.register(device)
        c.send({"push": "pushkey-of-%s-0123456789" % device, "app": "com.x"})
        await c.expect("push_set", app="com.x")
        await c.close()
    code, out, err = run_admin("--redis", redis.url, "inbox", "bob")
    assert code == 0 and "push: app com.x, pushkey push" in out, (out, err)
    assert "pushkey-of-bob-0123456789" not in out + err
    assert run_admin("--redis", redis.url, "revoke", "bob")[0] == 0
    assert stored(redis, "bob") == {}
    assert run_admin("--redis", redis.url, "purge", "carol")[0] == 0
    assert stored(redis, "carol") == {}
