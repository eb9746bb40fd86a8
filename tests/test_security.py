"""
Hostile clients and careless deployments (issue 15): each defence, tried
through the real path (sockets in, bytes out, state in the store).
"""

import json

import pytest_twisted

from chatd import packets
from tests.helpers import wait_until

ensure = pytest_twisted.ensureDeferred


def _nested(levels, inner='"x"'):
    """A ping whose value nests ``levels`` lists deep inside the packet."""
    return '{"ping": %s%s%s}' % ("[" * levels, inner, "]" * levels)


# -- 10. nesting ------------------------------------------------------------------------

@ensure
async def test_json_nests_no_deeper_than_literals(chatd, clients):
    """A ping nested ~975 deep used to parse and then make its own echo raise
    (RecursionError: 'unavailable' and a critical traceback, per packet).
    JSON now has the literals' bound: 32 containers, the packet included."""
    from twisted.logger import globalLogPublisher
    critical = []

    def observe(event):
        if event.get("log_level") is not None and event["log_level"].name == "critical":
            critical.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        node = await chatd()
        c = await clients(node)
        deepest = packets.MAX_DEPTH - 1  # lists inside the packet object
        c.send(_nested(deepest))
        pong = await c.expect("pong")
        assert json.dumps(pong["ping"]) == "[" * deepest + '"x"' + "]" * deepest
        for line in (_nested(deepest + 1), _nested(975),
                     "{'ping': %s'x'%s}" % ("[" * (deepest + 1), "]" * (deepest + 1))):
            c.send(line)
            err = await c.error("bad_packet")
            assert "deep" in err["reason"]
        c.send({"ping": "still here"})
        await c.expect("pong", ping="still here")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert critical == []
