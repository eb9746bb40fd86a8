"""
A connection that is closed never takes a device over, whatever the load
(issue 24's correctness bug). Under a reconnect storm a phone's reconnect
can be slow enough that chatd (auth timeout) or the phone gives up on that
connection and the phone connects again; the old reconnect, still on its
way, used to go on and claim the device, closing the phone's live new
connection with ``session_replaced``.

Here the old reconnect's claim is held back (its node's store call waits on
a gate), the phone gives up on it and binds on another node, and then the
old claim reaches the real store.
"""

import pytest_twisted

from tests.helpers import wait_until

ensure = pytest_twisted.ensureDeferred


def hold_claims(node):
    """Make ``node``'s claims wait until the returned gate fires (the store
    call itself is real): (gate, entered Deferred)."""
    from twisted.internet import defer
    presence = node.service.presence
    real = presence.claim
    gate, entered = defer.Deferred(), defer.Deferred()

    async def held(*args, **kw):
        if not entered.called:
            entered.callback(None)
        await gate
        return await real(*args, **kw)

    presence.claim = lambda *a, **kw: defer.ensureDeferred(held(*a, **kw))
    node.service.factory.hub.remote = presence
    return gate, entered


@ensure
async def test_a_reconnect_of_a_closed_connection_never_takes_over(chatd, clients, redis):
    from tests.helpers import with_deadline
    x = await chatd(token_rotation=False)
    y = await chatd(token_rotation=False)
    first = await clients(y)
    token = await first.register("phone")
    await first.close()
    gate, entered = hold_claims(x)
    old = await clients(x)
    old.send({"reconnect": "true", "sender": "phone", "token": token})
    await with_deadline(entered, what="the old reconnect's claim under way")
    # the phone gives up on it (chatd may not even see that yet: it reads
    # nothing more from a connection whose reconnect is under way)
    await old.close()
    new = await clients(y)
    await new.reconnect("phone", token)
    holder = redis.command("GET", "chatd:{phone}:node")
    gate.callback(None)  # the old claim reaches the store now
    await wait_until(lambda: not x.service.presence._claiming, what="the old claim done")
    await wait_until(lambda: "phone" not in x.hub.sessions, what="nothing bound on x")
    new.send({"ping": "still mine"})
    assert await new.next() == {"type": "pong", "ping": "still mine"}
    assert redis.command("GET", "chatd:{phone}:node") == holder
    assert "phone" in y.hub.sessions
