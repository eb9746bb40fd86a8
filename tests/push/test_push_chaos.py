"""
Push wake-ups under chaos: two chatd processes on one store, SIGKILLed and
restarted, and the store SIGKILLed and SIGTERMed (``appendfsync always``),
each right after a message was ``accepted``, while the gateway answers
``503`` (so the wake-ups stay due, retrying, through every fault). No due
wake-up is lost: once the gateway is back, every receiver's latest accepted
message is announced (an ``event_id`` at least its id).
"""

import random
import signal

import pytest
import pytest_twisted

from tests.clients import connect
from tests.fixtures.nodes import ChatdNodes
from tests.fixtures.valkey import ValkeyServer
from tests.helpers import pass_time, wait_until

ensure = pytest_twisted.ensureDeferred

RECEIVERS = ["r%d" % i for i in range(8)]


@pytest.fixture
def store(tmp_short):
    server = ValkeyServer(tmp_short + "/store", appendfsync="always")
    try:
        server.start().wait_ready()
        yield server
    finally:
        server.cleanup()


async def reliably(nodes, packet, reply):
    """Send ``packet`` (with its ref) on a fresh connection to a live node
    until it is answered ``reply``; retried on loss or ``unavailable``."""
    for _ in range(200):
        live = [p for p in nodes if p.running and p.port]
        c = None
        try:
            c = await connect(random.choice(live).port)
            await c.register("sender")
            c.send(packet)
            msg = await c.next(5)
            if msg.get("type") == reply:
                return msg
        except (AssertionError, OSError, IndexError):
            pass
        finally:
            if c is not None:
                await c.close()
        await pass_time(0.2)
    raise AssertionError("never answered %s: %r" % (reply, packet))


@pytest.mark.slow
@pytest.mark.timeout(240)
@ensure
async def test_no_due_wakeup_is_lost_across_chatd_and_store_kills(tmp_short, store, gateway):
    started = ChatdNodes(tmp_short, "--redis", store.url)
    try:
        nodes = await started.start(2, "--push-url", gateway.url, "--push-interval", "1s",
                                    "--push-timeout", "2s", "--redis-timeout", "1s")
        for i, device in enumerate(RECEIVERS):
            c = await connect(nodes[i % 2].port)
            await c.register(device)
            c.send({"push": "pk-" + device, "app": "com.x"})
            await c.expect("push_set")
            await c.close()
        gateway.mode = "503"  # wake-ups stay due (retrying) through the faults
        rng = random.Random(20)
        last = {}
        faults = ["chatd", "store_kill", "chatd", "store_term", "chatd", "store_kill"]
        for n, fault in enumerate(faults):
            for receiver in rng.sample(RECEIVERS, 3):
                msg = await reliably(nodes, {"message": "m%d" % n, "receiver": receiver,
                                             "ref": "%d-%s" % (n, receiver)}, "accepted")
                last[receiver] = msg["id"]
            if fault == "chatd":
                victim = rng.choice(nodes)
                victim.kill(signal.SIGKILL)
                victim.start()
                await victim.await_listening()
            else:
                store.send_signal(signal.SIGKILL if fault == "store_kill" else signal.SIGTERM)
                await store.await_exit(30)
                store.start()
                await store.await_ready()

        gateway.mode = "ok"
        since = len(gateway.requests)

        def announced():
            best = {}
            for r in gateway.requests[since:]:
                key = r.pushkey[3:]
                best[key] = max(best.get(key, ""), r.notification["event_id"])
            return all(best.get(d, "") >= i for d, i in last.items())

        await wait_until(announced, 40, "a wake-up for every receiver's latest message")
    finally:
        started.finish()
