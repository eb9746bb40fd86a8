"""Push wake-ups as operators see them: chatd_push_total by result,
chatd_push_seconds, chatd_push_due; and no pushkey in full in any log line."""

import pytest_twisted
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import formatEvent, globalLogPublisher

from chatd.ops.metrics import registry_for
from tests.fixtures.gateway import away, message
from tests.helpers import wait_until

ensure = pytest_twisted.ensureDeferred

PUSHKEY = "PUSHKEY-very-secret-0123456789"


def samples(chat):
    text = generate_latest(registry_for(chat)).decode()
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def value(chat, name, **labels):
    for s in samples(chat):
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


@ensure
async def test_push_metrics_and_logs(chatd, clients, redis, gateway):
    lines = []

    def observe(event):
        lines.append(formatEvent(event) + repr(event))

    globalLogPublisher.addObserver(observe)
    try:
        gateway.mode = lambda req: "503" if len(gateway.requests) == 1 else "reject"
        node = await chatd(push_url=gateway.url, push_interval=1.0, push_timeout=1.0)
        assert value(node.service, "chatd_push_total", result="sent") == 0
        await away(clients, node, "bob", PUSHKEY, "com.x")
        alice, _ = await message(clients, node, "bob", "m")
        await gateway.next()
        await gateway.next()
        await wait_until(lambda: value(node.service, "chatd_push_total",
                                       result="rejected") == 1)
        assert value(node.service, "chatd_push_total", result="retried") == 1
        assert value(node.service, "chatd_push_seconds_count") == 2
        assert value(node.service, "chatd_push_due") is not None
    finally:
        globalLogPublisher.removeObserver(observe)
    assert any("rejected the pushkey" in line for line in lines), lines[-20:]
    assert not [line for line in lines if PUSHKEY in line]
