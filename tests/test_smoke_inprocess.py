import pytest_twisted

from tests.helpers import wait_until


@pytest_twisted.ensureDeferred
async def test_register_send_push_ack(chatd, clients, redis):
    node = await chatd()
    a = await clients(node)
    b = await clients(node)
    await a.register("alice")
    await b.register("bob")
    a.send({"message": "hi bob", "receiver": "bob", "ref": "r1"})
    acc = await a.expect("accepted", receiver="bob", ref="r1")
    push = await b.expect("message", sender="alice", receiver="bob", message="hi bob")
    assert push["id"] == acc["id"]
    b.send({"ack": push["id"]})
    assert await b.sync() == []
    await wait_until(lambda: redis.command("LLEN", "chatd:{bob}:inbox") == 0)
