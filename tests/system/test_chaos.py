"""
The chaos harness (tests/system/chaos.py) in a short form: a few dozen clients chat
through a twistd chatd while it is SIGKILLed and SIGTERMed, Redis is stopped
and killed (external mode), connections are cut between a push and its ack
and between a send and its reply, and clients stop reading. Nothing accepted
may be lost, nothing pushed twice on one connection, every unanswered send
must come through on retry with its ref. Most devices opt in to receipts:
each reaches its sender once per connection, never with a lower ``upto``,
and every acked message is covered by one (tests/system/chaos_receipts.py).

``pytest --long`` runs each in its long form (600 s, 200 clients); other
forms by hand: ``python -m tests.system.chaos --help`` (docs/testing.rst).
"""

import json

import pytest
import pytest_twisted

from tests.helpers import with_deadline
from tests.system import chaos

ensure = pytest_twisted.ensureDeferred


def check(report, cfg):
    print("\n" + report.format())
    assert report.problems() == [], report.format()
    # the run really was a chaos run: every kind of fault happened, sends
    # went unanswered and were retried, and all of it still adds up
    for kind in cfg.faults:
        assert report.faults.get(kind, 0) >= 1, "no %s fault in:\n%s" % (kind, report.format())
    assert report.accepted == report.sent == report.delivered, report.format()
    # receipts (1.2) flowed: delivered ones for acks, read ones for reads
    assert report.receipts_opted and report.receipts_missing == 0, report.format()
    assert report.receipts.get("delivered", 0) >= 1, report.format()
    if "cut_inflight" not in cfg.faults:
        return
    assert report.noreply >= 1, report.format()
    assert set(report.noreply_outcomes) == {"accepted on retry, delivered"}, report.format()
    assert report.repushes >= 1, report.format()  # unacked pushes came again
    assert report.left_in_inboxes == 0 and report.clean_stop


@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.timeout(150)
@ensure
async def test_chaos_embedded_store(chaos_form):
    """chatd on its embedded store, SIGKILLed (its store child survives as
    an orphan and the next chatd stops it cleanly) and SIGTERMed."""
    cfg = chaos.Config(mode="embedded", **chaos_form(duration=22, clients=30), rate=2.0,
                       fault_every=1.0, settle=60)
    report = await chaos.run(cfg)
    check(report, cfg)


@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.timeout(150)
@ensure
async def test_chaos_external_redis(chaos_form):
    """chatd on a valkey-server of the harness (appendonly yes). Redis is
    restarted with SIGTERM and also SIGKILLed, so it runs with appendfsync
    always for this run (with everysec a SIGKILLed store may lose its last
    second of acknowledged writes)."""
    cfg = chaos.Config(mode="redis", redis_sigkill=True, **chaos_form(duration=24, clients=30),
                       rate=2.0, fault_every=1.0, redis_down_max=3.5, settle=60)
    report = await chaos.run(cfg)
    assert report.appendfsync == "always"
    check(report, cfg)
    # some Redis outages outlasted --redis-timeout: clients got "unavailable"
    # and retried with the same ref
    assert report.send_errors.get("unavailable", 0) + report.conn_errors.get("unavailable", 0) >= 1


@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.timeout(150)
@ensure
async def test_chaos_sentinel_failovers(chaos_form):
    """Two nodes with --store-acks 1 on a Sentinel-managed primary and
    replica: the primary SIGKILLed (restarted, it becomes the replica) and
    failed over by hand (each waits until the sentinels settle, so only a
    few fit in a short run; node kills and client faults are covered by the
    other modes): the same checks."""
    cfg = chaos.Config(mode="sentinel", nodes=2, **chaos_form(duration=25, clients=30), rate=2.0,
                       fault_every=1.0, settle=60, faults=("primary_sigkill", "failover"))
    report = await chaos.run(cfg)
    check(report, cfg)
    assert report.send_errors.get("unavailable", 0) >= 1  # the failovers were felt


@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.timeout(150)
@ensure
async def test_chaos_cluster_failovers(chaos_form):
    """Two nodes with --store-acks 1 on a Valkey Cluster 3x2: random
    primaries SIGKILLed (their replicas take over; restarted, they rejoin as
    replicas) and replicas taking over by hand: the same checks."""
    cfg = chaos.Config(mode="cluster", nodes=2, **chaos_form(duration=20, clients=30), rate=2.0,
                       fault_every=1.0, settle=60, faults=("primary_sigkill", "failover"))
    report = await chaos.run(cfg)
    check(report, cfg)


@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.timeout(150)
@ensure
async def test_chaos_three_nodes(chaos_form):
    """Three chatd nodes on one valkey-server (appendfsync always), clients
    on random nodes (a reconnect lands anywhere), nodes SIGKILLed and
    SIGTERMed, the store stopped and killed: the same checks, cluster-wide."""
    cfg = chaos.Config(mode="nodes", nodes=3, redis_sigkill=True,
                       **chaos_form(duration=20, clients=30), rate=2.0, fault_every=1.0,
                       redis_down_max=2.5, settle=60)
    report = await chaos.run(cfg)
    check(report, cfg)


@ensure
async def test_graceful_stop_answers_every_send_it_has_read(chatd, clients, redis):
    """docs/protocol.rst: on SIGTERM chatd "stops reading, answers what it
    has read, sends shutdown to everyone". Sends are held in flight by
    pausing the store's writes, then the node is stopped: each sender must
    get its ``accepted`` before ``shutdown`` (each message is stored)."""
    from twisted.internet import defer

    from tests.helpers import wait_until
    node = await chatd()
    receiver = await clients(node)
    await receiver.register("bob")
    senders = []
    for name in ("alice", "carol", "dave"):
        c = await clients(node)
        await c.register(name)
        senders.append(c)
    redis.command("CLIENT", "PAUSE", "600", "WRITE")
    for i, c in enumerate(senders):
        c.send({"message": "in flight at stop %d" % i, "receiver": "bob", "ref": "s%d" % i})
    await wait_until(lambda: sum(conn._inflight for conn in node.factory.connections) == 3,
                     what="three sends in flight")
    stopping = defer.ensureDeferred(node.stop())
    try:
        for i, c in enumerate(senders):
            got = []
            while True:
                line = await with_deadline(c.lines.get(), 10, "a line")
                if line is None:
                    break
                got.append(json.loads(line))
            assert [m["type"] for m in got] == ["accepted", "error"], (
                "sender %d got %r (a stored message went unanswered at the stop)" % (i, got))
            assert got[0]["ref"] == "s%d" % i and got[1]["code"] == "shutdown"
    finally:
        await stopping
    assert redis.command("LLEN", "chatd:{bob}:inbox") == 3


def test_the_checks_can_fail():
    """The harness's checks, fed made-up events, catch what they must."""
    t = chaos.Tracker()

    def sent(ref, text, server_id=None):
        s = t.new_send("alice", "bob", ref, text, 0.0)
        t.attempt(s, 0.0)
        if server_id is not None:
            t.accepted(s, "%016d" % server_id, 0.1)
        return s

    def push(serial, server_id, text, sender="alice", receiver="bob"):
        line = ('{"type":"message","id":"%016d","sent_at":1,"sender":"%s",'
                '"receiver":"%s","message":"%s"}' % (server_id, sender, receiver, text)).encode()
        t.push(receiver, serial, line, {"id": "%016d" % server_id, "sender": sender,
                                        "receiver": receiver, "message": text})

    sent("r1", "one", 1)
    sent("r2", "two", 2)
    sent("r3", "three", 3)          # accepted, never pushed: lost
    sent("r4", "four", 4)
    unanswered = sent("r5", "five")  # no reply, never retried: unresolved
    t.no_reply(unanswered)
    at_stop = sent("r6", "six", 6)   # stored at sent_at 1, told "shutdown" at 2, no reply
    t.no_reply(at_stop, shutdown_ms=2)
    c1 = t.conn_opened()
    push(c1, 1, "one")
    push(c1, 1, "one")              # twice on one connection
    push(c1, 4, "four")             # skips 2 and 3 on this connection
    c2 = t.conn_opened()
    push(c2, 2, "two")
    push(c2, 5, "two")              # the same text under another id: stored twice
    push(c2, 6, "nobody sent this")
    c3 = t.conn_opened()
    push(c3, 6, "six")
    r = t.report()
    assert r.lost == 1 and r.lost_examples[0][2] == "r3"
    assert r.pushed_twice == 1
    assert r.out_of_order == 2      # the gap on c1 and the one on c2
    assert r.stored_twice == 1 and r.id_mismatch == 1
    assert r.unresolved == 1 and r.noreply == 2
    assert r.unanswered_at_shutdown == 1 and r.unanswered_examples[0][1] == "r6"
    problems = " | ".join(r.problems())
    for word in ("lost 1", "repeated on one connection", "out-of-order", "two ids",
                 "never answered", "pushed_but_never_sent", "stopping chatd"):
        assert word in problems, problems
    clean = chaos.Tracker()
    s = clean.new_send("a", "b", 1, "x", 0.0)
    clean.attempt(s, 0.0)
    clean.no_reply(s)
    clean.attempt(s, 0.2)
    clean.accepted(s, "%016d" % 7, 0.3)
    serial = clean.conn_opened()
    line = b'{"type":"message","id":"0000000000000007","sent_at":1,"sender":"a","receiver":"b","message":"x"}'
    clean.push("b", serial, line, {"id": "0000000000000007", "sender": "a", "receiver": "b",
                                   "message": "x"})
    r = clean.report(left_in_inboxes=0)
    assert r.problems() == [] and r.noreply_outcomes == {"accepted on retry, delivered": 1}


def test_the_send_order_checks_can_fail():
    """One connection, one order: a reply that overtakes an earlier send's,
    and a later send stored under a lower id, are both caught; the same
    events in order are clean."""
    def run(reply_order, ids):
        t = chaos.Tracker()
        serial = t.conn_opened()
        sents = [t.new_send("alice", "bob", "r%d" % i, "m%d" % i, 0.0) for i in range(3)]
        for s in sents:
            t.attempt(s, 0.0, serial)
        for i in reply_order:
            t.answered(serial, sents[i])
            t.accepted(sents[i], "%016d" % ids[i], 0.1, serial)
        return t.report()

    assert run([0, 1, 2], [1, 2, 3]).send_order == 0
    bad = run([0, 2, 1], [1, 3, 2])
    assert bad.send_order == 2  # r2 answered before r1; and r1's id is lower than r2's
    problems = " | ".join(bad.problems())
    assert "reply_out_of_packet_order" in problems and "accepted_out_of_send_order" in problems
    assert run([0, 1, 2], [1, 3, 2]).send_order == 1  # in order, but ids not


def test_the_receipt_checks_can_fail():
    """Receipts (chaos_receipts), fed made-up events: one to a device that
    did not opt in, one repeated on a connection, a lower upto, one made
    twice, one naming no message, a gap in the sequence, and a pair left
    without its receipt are all caught; the same flow done right is clean."""
    def run(pushes, opted=("alice",)):
        t = chaos.Tracker()
        t.receipts.opted.update(opted)
        for i, text in enumerate(("one", "two", "three")):
            s = t.new_send("alice", "bob", "r%d" % i, text, 0.0)
            t.attempt(s, 0.0)
            t.accepted(s, "%016d" % (i + 1), 0.1)
        bob = t.conn_opened()
        for i, text in enumerate(("one", "two", "three")):
            line = ('{"type":"message","id":"%016d","sent_at":1,"sender":"alice",'
                    '"receiver":"bob","message":"%s"}' % (i + 1, text)).encode()
            t.push("bob", bob, line, json.loads(line))
        serials = {}
        for conn, device, rid, upto in pushes:
            if conn not in serials:
                serials[conn] = t.conn_opened()
            line = ('{"type":"receipt","id":"%016d","receiver":"bob","status":"delivered",'
                    '"upto":"%016d","at":5}' % (rid, upto)).encode()
            t.receipt(device, serials[conn], line, json.loads(line))
        return t.report(left_in_inboxes=0)

    good = run([(1, "alice", 1, 2), (1, "alice", 2, 3), (2, "alice", 2, 3)])
    assert good.problems() == [] and good.receipts == {"delivered": 3}
    assert good.receipts_missing == 0
    cases = {
        "receipt_to_a_device_that_did_not_opt_in": [(1, "alice", 1, 3)],
        "pushes repeated on one connection": [(1, "alice", 1, 3), (1, "alice", 1, 3)],
        "receipt_upto_not_rising_on_one_connection": [(1, "alice", 1, 3), (1, "alice", 2, 2)],
        "receipt_made_twice": [(1, "alice", 1, 3), (2, "alice", 2, 3)],
        "receipt_for_no_message": [(1, "alice", 1, 9), (1, "alice", 2, 3)],
        "gaps on one connection": [(1, "alice", 1, 2), (1, "alice", 3, 3)],
        "receipt_missing": [(1, "alice", 1, 2)],
    }
    for word, pushes in cases.items():
        r = run(pushes, opted=() if "opt_in" in word else ("alice",))
        problems = " | ".join(r.problems())
        assert word in problems, (word, problems)
