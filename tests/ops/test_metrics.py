"""
``--metrics``: /metrics scraped over HTTP after known traffic, and /health
through a frozen store (SIGSTOP) and a shutdown; chatd runs as users run it
(twistd, embedded store) except for the shutdown test, which needs to stop a
node while the test holds on to its /health.
"""

import json
import re
import os
import signal

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from tests.clients import BlockingLineClient, http_get
from tests.fixtures.nodes import ChatdProcess
from tests.fixtures.process import fixed_port, wait_for


def scrape(base):
    """{(sample name, frozenset of labels without node): value}, and the node labels."""
    status, body = http_get(base + "/metrics")
    assert status == 200, body
    samples, nodes = {}, set()
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = dict(s.labels)
            if "node" in labels:
                nodes.add(labels.pop("node"))
            samples[(s.name, frozenset(labels.items()))] = s.value
    return samples, nodes


def value(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


def node_id(proc):
    """The node id the process logged at start ("chatd node <id> starting")."""
    m = re.search(r"chatd node (\S+) starting", proc.log(since_start=True))
    assert m, proc.log(since_start=True)[-2000:]
    return m.group(1)


@pytest.fixture
def node(tmp_short):
    """A twistd chatd with --metrics, on its embedded store: (process, base URL)."""
    mport = fixed_port()
    proc = ChatdProcess(tmp_short, [
        "--port", "tcp:0:interface=127.0.0.1", "--data-dir", os.path.join(tmp_short, "data"),
        "--metrics", "tcp:%d:interface=127.0.0.1" % mport, "--redis-timeout", "1s",
        "--rate-limit", "0"])
    try:
        proc.start().wait_listening()
        yield proc, "http://127.0.0.1:%d" % mport
    finally:
        for pid in proc.store_pids():
            os.kill(pid, signal.SIGCONT)
        proc.cleanup()


def test_metrics_count_known_traffic(node):
    proc, base = node
    alice, bob = BlockingLineClient(proc.port), BlockingLineClient(proc.port)
    try:
        alice.register("alice")
        bob.register("bob")
        assert alice.message("bob", "one", "r1")["type"] == "accepted"
        assert alice.message("bob", "two", "r2")["type"] == "accepted"
        assert alice.message("bob", "one", "r3")["type"] == "duplicate"
        assert alice.message("nobody", "x")["code"] == "unknown_receiver"
        alice.send("not json")
        assert alice.expect("error")["code"] == "bad_packet"
        first = bob.expect("message", message="one")
        second = bob.expect("message", message="two")
        bob.send({"ack": second["id"]})
        bob.send({"ack": "9" * 16})
        assert bob.expect("error")["code"] == "bad_ack"
        bob.send({"ack": first["id"]})  # an older id, still pushed here: a valid ack
        bob.send({"ping": "sync"})
        bob.expect("pong")

        samples, nodes = scrape(base)
        assert nodes == {node_id(proc)}
        assert value(samples, "chatd_messages_total", result="accepted") == 2
        assert value(samples, "chatd_messages_total", result="duplicate") == 1
        assert value(samples, "chatd_messages_total", result="unknown_receiver") == 1
        assert value(samples, "chatd_messages_total", result="inbox_full") == 0
        assert value(samples, "chatd_messages_total", result="unavailable") == 0
        assert value(samples, "chatd_errors_total", code="unknown_receiver") == 1
        assert value(samples, "chatd_errors_total", code="bad_packet") == 1
        assert value(samples, "chatd_errors_total", code="bad_ack") == 1
        assert value(samples, "chatd_errors_total", code="slow_consumer") == 0
        assert value(samples, "chatd_slow_consumer_total") == 0
        assert value(samples, "chatd_pushes_total") == 2
        assert value(samples, "chatd_acks_total") == 2
        assert value(samples, "chatd_connections") == 2
        assert value(samples, "chatd_bound_devices") == 2
        assert value(samples, "chatd_store_unavailable_total") == 0
        # one batch per reactor turn: at least one send call, at most one per message
        sends = value(samples, "chatd_store_seconds_count", script="send")
        assert 1 <= sends <= 4
        assert value(samples, "chatd_store_seconds_bucket", script="send", le="+Inf") == sends
        assert value(samples, "chatd_store_seconds_sum", script="send") > 0
        assert value(samples, "chatd_store_seconds_count", script="fetch") >= 2  # two binds
        assert value(samples, "process_cpu_seconds_total") > 0
        assert value(samples, "process_open_fds") > 0
    finally:
        alice.close()
        bob.close()
    wait_for(lambda: value(scrape(base)[0], "chatd_connections") == 0, 10, "connections 0")
    assert value(scrape(base)[0], "chatd_bound_devices") == 0


def test_health_turns_503_while_the_store_is_frozen_and_200_after(node):
    proc, base = node
    status, body = http_get(base + "/health")
    assert status == 200, body
    health = json.loads(body)
    assert health["status"] == "ok" and health["node"] == node_id(proc)
    (store_pid,) = proc.store_pids()
    alice = BlockingLineClient(proc.port)
    try:
        alice.register("alice")
        os.kill(store_pid, signal.SIGSTOP)
        # the probe itself answers (no hang) and says why
        status, body = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(
            http_get(base + "/health")), 15, "/health 503")
        health = json.loads(body)
        assert health["status"] == "unavailable"
        assert "store" in health["reason"], health
        assert alice.message("alice", "to myself")["code"] == "unavailable"
        os.kill(store_pid, signal.SIGCONT)
        wait_for(lambda: http_get(base + "/health")[0] == 200, 15, "/health 200 again")
        samples, _ = scrape(base)
        assert value(samples, "chatd_store_unavailable_total") >= 1
        assert value(samples, "chatd_messages_total", result="unavailable") == 1
        assert value(samples, "chatd_errors_total", code="unavailable") == 1
    finally:
        os.kill(store_pid, signal.SIGCONT)
        alice.close()


async def _get(port, path, parse=json.loads):
    """GET from a node of this process (through the reactor): (status, body)."""
    from twisted.internet import reactor
    from twisted.web.client import Agent, readBody

    from tests.helpers import with_deadline
    response = await with_deadline(Agent(reactor).request(
        b"GET", b"http://127.0.0.1:%d%s" % (port, path)), what="an HTTP response")
    body = await with_deadline(readBody(response), what="an HTTP body")
    return response.code, parse(body)


async def _metrics_of(node):
    """A started MetricsService of an in-process node, and its port."""
    from chatd.ops.metrics import MetricsService
    metrics = MetricsService("tcp:0:interface=127.0.0.1", node.service)
    metrics.startService()
    await metrics._listening
    return metrics, metrics.port.getHost().port


@pytest_twisted.ensureDeferred
async def test_metrics_count_a_slow_consumer(chatd, clients):
    from tests.helpers import connect_sleeper, send_until_cut
    node = await chatd(output_limit=64 * 1024)
    metrics, port = await _metrics_of(node)
    a = await clients(node)
    await a.register("alice")
    try:
        sleeper = await connect_sleeper(node, "sleeper")
        try:
            n = await send_until_cut(a, node, "sleeper")
            code, text = await _get(port, b"/metrics", bytes.decode)
            assert code == 200
            samples = {(s.name, frozenset((k, v) for k, v in s.labels.items() if k != "node")):
                       s.value for f in text_string_to_metric_families(text) for s in f.samples}
            assert value(samples, "chatd_slow_consumer_total") == 1
            assert value(samples, "chatd_errors_total", code="slow_consumer") == 1
            assert value(samples, "chatd_messages_total", result="accepted") == n
            assert 1 <= value(samples, "chatd_pushes_total") <= n
        finally:
            sleeper.close()
    finally:
        await metrics.stopService()


@pytest_twisted.ensureDeferred
async def test_health_says_shutting_down_while_the_node_stops(chatd, clients):
    node = await chatd()
    metrics, port = await _metrics_of(node)
    try:
        code, body = await _get(port, b"/health")
        assert (code, body["status"], body["connections"]) == (200, "ok", 0)
        node.service.node_id = "node-7"  # the node label follows a node id set later
        code, body = await _get(port, b"/health")
        assert (code, body["node"]) == (200, "node-7")
        c = await clients(node)
        await c.register("alice")
        code, body = await _get(port, b"/health")
        assert (code, body["connections"], body["bound_devices"]) == (200, 1, 1)
        stopping = node.service.stopService()
        code, body = await _get(port, b"/health")
        assert (code, body["status"], body["reason"]) == (503, "unavailable", "shutting down")
        await c.error("shutdown")
        await stopping
        code, body = await _get(port, b"/health")
        assert (code, body["reason"]) == (503, "shutting down")
    finally:
        await metrics.stopService()


def test_metrics_option_is_off_by_default_and_checked():
    from twisted.python import usage

    from chatd.app.tap import Options
    o = Options()
    o.parseOptions([])
    assert o.settings.metrics is None
    o = Options()
    o.parseOptions(["--metrics", "tcp:9100:interface=127.0.0.1"])
    assert o.settings.metrics == "tcp:9100:interface=127.0.0.1"
    with pytest.raises(usage.UsageError, match="--metrics"):
        Options().parseOptions(["--metrics", "nonsense:9100"])
