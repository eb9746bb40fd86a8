"""
The store's layout (chatd/store/layout.py) is the one home of the key names,
the notify payloads and the stored form of a message; the Lua gets its
constants from it. These tests hold the Python side and the Lua side to it
on a real store: what send.lua stores and returns is what the layout says.
"""

import json

import pytest_twisted

from chatd.store import layout
from chatd.wire import packets


def test_a_stored_message_is_its_push_line():
    tail = layout.push_tail("a", "b", 'say "hi" ü')
    line = layout.ENTRY_HEAD + packets.format_id(42).encode() + layout.ENTRY_MID + b"1700000000123" + tail
    assert json.loads(line) == {"type": "message", "id": "0000000000000042",
                                "sent_at": 1700000000123, "sender": "a", "receiver": "b",
                                "message": 'say "hi" ü'}
    assert layout.entry_id(line) == 42 and layout.entry_id_text(line) == "0000000000000042"
    assert line[layout.SENT_AT_START:].startswith(b"1700000000123,")
    constants = layout.lua_constants().decode()
    assert "local ID_FIRST, ID_LAST, SENT_AT_FIRST = %d, %d, %d" % (
        layout.ID_START + 1, layout.ID_END, layout.SENT_AT_START + 1) in constants


def test_keys_channels_and_notices():
    assert layout.key("0011", layout.INBOX) == b"chatd:{0011}:inbox"
    assert layout.channel("0011") == b"chatd:{0011}:notify"
    assert layout.device_of(b"chatd:{a:b}:notify", layout.NOTIFY) == "a:b"
    assert layout.device_of(b"chatd:{a}:inbox", layout.NOTIFY) is None
    assert layout.parse_notice(b"m {\"x\":1}") == ("m", b"{\"x\":1}")
    assert layout.parse_notice(b"k 7 n1") == ("k", (7, "n1"))
    assert layout.parse_notice(b"revoked") == ("revoked", None)
    assert layout.parse_notice(b"z") is None


@pytest_twisted.ensureDeferred
async def test_send_lua_stores_and_returns_the_layouts_line(redis):
    """Through a real store: the line send.lua returns is the inbox entry and
    its id is where the layout says (the receiver bound on another node makes
    send.lua publish it too, on the channel the prelude builds)."""
    from twisted.internet import defer, reactor

    from chatd.app.config import Settings
    from chatd.redis.client import RedisClient
    from chatd.store.library import Library
    from chatd.store.steps import Store
    from tests.helpers import with_deadline
    client = RedisClient(redis.target, 5.0, reactor, library=Library()).connect()
    try:
        assert await with_deadline(client.when_connected(5), what="connection")
        store = Store(client, Settings(), reactor, "nodeA")
        assert await store.register("bob", b"h" * 64) == "ok"
        redis.command("SET", "chatd:{bob}:node", "nodeB 1")
        d = defer.Deferred()
        store.send_then(lambda result, failure: d.callback((result, failure)),
                        "alice", "bob", "hello", ref="r1")
        result, failure = await with_deadline(d, what="the send")
        assert failure is None and result.status == "accepted"
        stored = redis.command("LRANGE", "chatd:{bob}:inbox", 0, -1)
        assert stored == [result.entry]
        assert layout.entry_id_text(result.entry) == result.id == "0000000000000001"
        pushed = json.loads(result.entry)
        assert (pushed["id"], pushed["sender"], pushed["message"]) == (result.id, "alice", "hello")
    finally:
        await client.close()
