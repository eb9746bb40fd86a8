"""
chatd on a Sentinel-managed store (``--redis redis+sentinel://...``): real
valkey-servers and sentinels (tests/fixtures/sentinel.py), real chatd processes.

A SIGKILL of the primary with ``--store-acks 1``: senders see
``unavailable`` while there is no primary (and while the new one has no
replica to confirm), then go on; every message that got ``accepted`` reaches
its receiver once, in the order sent, live across two nodes (the subscriber
connection follows the failover too).
"""

import json
import re
import signal
import time

import pytest
import pytest_twisted

from tests.clients import connect
from tests.fixtures.nodes import ChatdNodes, ChatdProcess
from tests.fixtures.valkey import info
from tests.helpers import wait_until

ensure = pytest_twisted.ensureDeferred



@pytest.mark.parametrize("argv, message", [
    (["--redis", "redis+sentinel://h:x/m"], "bad sentinel address 'h:x'"),
    (["--redis", "redis+sentinel://h:1/"], "no master name"),
    (["--redis", "redis+sentinel://h:1/m/x"], "expected /<master>/<db>"),
    (["--store-acks", "1"], "--store-acks needs --redis"),
    (["--store-acks", "many", "--redis", "redis://h"], "--store-acks"),
])
def test_option_errors_name_the_option(argv, message):
    from twisted.python import usage

    from chatd.app.tap import Options
    with pytest.raises(usage.UsageError, match=re.escape(message)):
        Options().parseOptions(argv)


def test_sentinel_url_forms():
    from chatd.redis.target import parse_redis_url
    t = parse_redis_url("rediss+sentinel://:pw@a:1,[::1]:2,b/mymaster/3")
    assert (t.sentinels, t.master, t.db, t.password, t.tls) == (
        (("a", 1), ("::1", 2), ("b", 26379)), "mymaster", 3, "pw", True)
    assert t.describe() == "rediss+sentinel://a:1,::1:2,b:26379/mymaster/3"
    assert "pw" not in repr(t)
    t = parse_redis_url("redis+sentinel://a:1/m")
    assert (t.db, t.tls, t.password) == (0, False, None)


@pytest.fixture
def nodes(tmp_short):
    """chatd processes: ``await nodes(n, "--redis", url, *more)``."""
    started = ChatdNodes(tmp_short, "--rate-limit", "0", "--redis-timeout", "1s",
                         "--presence-lease", "15s")
    yield started.start
    started.finish()


async def send_until_accepted(alice, i, deadline=60, meanwhile=lambda: None):
    """Send message ``i`` (ref ``r<i>``) until it is accepted (calling
    ``meanwhile`` after each ``unavailable``); the ``unavailable`` replies met
    on the way, and the accepted id."""
    unavailable = 0
    loop_until = time.monotonic() + deadline
    while True:
        alice.send({"message": "m%d" % i, "receiver": "bob", "ref": "r%d" % i})
        reply = await alice.next()
        if reply["type"] == "accepted":
            return unavailable, reply["id"]
        assert reply.get("code") == "unavailable", reply
        unavailable += 1
        assert time.monotonic() < loop_until, "m%d never accepted" % i
        meanwhile()


@pytest.mark.slow
@ensure
async def test_primary_sigkill_with_store_acks_loses_nothing_accepted(sentinels, nodes):
    a, b = await nodes(2, "--redis", sentinels.url(), "--store-acks", "1")
    alice, bob = await connect(a.port), await connect(b.port)
    try:
        await alice.register("alice")
        await bob.register("bob")
        got = []

        async def receive(upto):
            while len(got) < upto:
                push = await bob.next(timeout=60)
                if push["type"] == "error":
                    # an ack that met the outage: the next (cumulative) one covers it
                    assert push["code"] == "unavailable" and "ack" in push["reason"], push
                    continue
                assert push["type"] == "message", push
                got.append((push["id"], push["message"]))
                bob.send({"ack": push["id"]})

        accepted, unavailable = [], 0
        for i in range(20):
            u, server_id = await send_until_accepted(alice, i)
            unavailable += u
            accepted.append((server_id, "m%d" % i))
        await receive(20)

        old = sentinels.primary()
        old.kill()
        # every send from now on waits for a new primary that has a replica:
        # the old one, started again, is made a replica by the sentinels
        restarted, moved_to = [], []

        def restart_once_moved():
            if not restarted:
                now = sentinels.primary()
                if now is not old:
                    moved_to.append(now)
                    restarted.append(old.start())

        for i in range(20, 60):
            # a hang guard, not a speed limit: on a busy machine a failover
            # the sentinels abort is tried again only after 2 x failover-timeout
            u, server_id = await send_until_accepted(alice, i, deadline=150,
                                                     meanwhile=restart_once_moved)
            unavailable += u
            accepted.append((server_id, "m%d" % i))
        assert restarted, "the sentinels never moved the primary"
        await receive(60)
        # nothing lost, nothing twice, in the order sent; the ids the
        # receiver got are the ids the sender was told
        assert got == accepted
        assert unavailable > 0, "the failover was never seen by the sender"
        # chatd followed the sentinels to the primary they moved to (which
        # they may have moved again since: under the whole suite's load they
        # once failed back to the restarted old one, so that is not asserted)
        assert "store primary for chatdmaster: 127.0.0.1:%d" % moved_to[0].port in a.log()
        now = sentinels.primary()
        assert info(now.port, "replication")["role"] == "master"
    finally:
        await alice.close()
        await bob.close()


@pytest.mark.slow
@ensure
async def test_a_master_name_no_sentinel_knows_is_a_start_error(sentinels, tmp_short):
    p = ChatdProcess(tmp_short, ["--port", "tcp:0:interface=127.0.0.1",
                                 "--redis", sentinels.url(master="nosuch")])
    try:
        p.start()
        assert await p.await_exit(30) is not None
        log = p.log()
        assert "chatd: could not start: --redis: no sentinel knows a master named " \
               "'nosuch'" in log, log[-3000:]
        assert "listening" not in log
    finally:
        p.cleanup()


@pytest.mark.slow
@ensure
async def test_a_demoted_primary_is_left_and_nothing_accepted_is_lost(sentinels, nodes):
    """A manual failover (SENTINEL FAILOVER) demotes the primary while
    chatd's connection to it stays open: writes there are refused (READONLY,
    or unconfirmed by --store-acks in the switch), chatd answers
    'unavailable' and finds the new primary through the sentinels; every
    accepted message is in the new primary's inbox, in order."""
    (a,) = await nodes(1, "--redis", sentinels.url(), "--store-acks", "1")
    old = sentinels.primary()
    new = next(s for s in sentinels.servers if s is not old)
    alice, bob = await connect(a.port), await connect(a.port)
    try:
        await alice.register("alice")
        await bob.register("bob")
        await bob.close()
        accepted = []
        for i in range(5):
            accepted.append((await send_until_accepted(alice, i))[1])
        await sentinels.fail_over()
        switched = "store primary for chatdmaster: 127.0.0.1:%d" % new.port
        i = 5
        while switched not in a.log() or i < 15:
            accepted.append((await send_until_accepted(alice, i))[1])
            i += 1
            assert i < 10000, "chatd never followed the failover:\n" + a.log()[-3000:]
        # it left at the sentinels' word, not at their closing its connection
        assert "the sentinels moved chatdmaster to 127.0.0.1:%d; leaving 127.0.0.1:%d" % (
            new.port, old.port) in a.log()
        sentinels.wait_settled(new)
        inbox = [json.loads(e) for e in new.command("LRANGE", "chatd:{bob}:inbox", 0, -1)]
        assert [e["message"] for e in inbox] == ["m%d" % n for n in range(i)]
        assert [e["id"] for e in inbox] == accepted
        assert old.command("ROLE")[0] == b"slave"
        # the operator's command reaches the same primary through the sentinels
        from tests.helpers import run_admin
        code, out, err = run_admin("--redis", sentinels.url(), "--json", "inbox", "bob")
        assert code == 0, err
        assert json.loads(out)["pending"] == i
    finally:
        await alice.close()


@pytest.mark.slow
@ensure
async def test_an_unconfirmed_message_is_never_pushed(replicated, nodes):
    """With --store-acks 1 and the replica frozen, a message is written on
    the primary but not confirmed: its sender gets 'unavailable' and its
    receiver, bound on another node, must not be pushed it (a failover now
    would lose it, and its id would be given to another message). Once the
    replica is back, the retry with the same ref is accepted under that id
    and pushed once."""
    primary, replica = replicated
    a, b = await nodes(2, "--redis", "redis://127.0.0.1:%d/0" % primary.port,
                        "--store-acks", "1")
    alice, bob = await connect(a.port), await connect(b.port)
    try:
        await alice.register("alice")
        await bob.register("bob")
        u, first = await send_until_accepted(alice, 0)
        assert u == 0
        push = await bob.expect("message", message="m0")
        bob.send({"ack": push["id"]})
        await wait_until(lambda: replica.command("LLEN", "chatd:{bob}:inbox") == 0,
                         what="the ack on the replica")
        bob.send({"ping": "acked"})
        assert (await bob.next())["type"] == "pong"

        replica.send_signal(signal.SIGSTOP)
        alice.send({"message": "m1", "receiver": "bob", "ref": "r1"})
        reply = await alice.next()
        assert reply["type"] == "error" and reply["code"] == "unavailable", reply
        assert "replica" in reply["reason"], reply
        # it is on the primary, published to node b, yet bob gets nothing
        assert len(primary.command("LRANGE", "chatd:{bob}:inbox", 0, -1)) >= 1
        bob.send({"ping": "p"})
        assert (await bob.next())["type"] == "pong"

        replica.send_signal(signal.SIGCONT)
        u, second = await send_until_accepted(alice, 1)
        push = await bob.expect("message", message="m1")
        assert push["id"] == second
        bob.send({"ping": "q"})
        assert (await bob.next())["type"] == "pong"  # and only once
    finally:
        await alice.close()
        await bob.close()


@pytest.mark.slow
@ensure
async def test_sentinels_with_a_password_of_their_own(tmp_short, nodes):
    """Sentinels with a requirepass of their own: chatd asks them after an AUTH
    with --sentinel-password-file's password, and serves; without it every
    sentinel refuses, and clients get 'unavailable'."""
    import os

    from tests.fixtures.sentinel import SentinelSet
    sentinels = SentinelSet(os.path.join(tmp_short, "stores"),
                            sentinel_password="sentinel-pw-123")
    try:
        sentinels.start()
        pw = os.path.join(tmp_short, "sentinel-password")
        with open(pw, "w") as f:
            f.write("sentinel-pw-123\n")
        os.chmod(pw, 0o600)
        (good,) = await nodes(1, "--redis", sentinels.url(), "--sentinel-password-file", pw)
        (bad,) = await nodes(1, "--redis", sentinels.url())
        c = await connect(good.port)
        await c.register("alice")
        assert sentinels.command("EXISTS", "chatd:{alice}:token") == 1
        d = await connect(bad.port)
        d.send({"register": "true", "sender": "bob"})
        await d.error("unavailable")
        assert "NOAUTH" in bad.log() or "Authentication" in bad.log(), bad.log()[-2000:]
        assert "sentinel-pw-123" not in good.log() + bad.log()
        await c.close()
        await d.close()
    finally:
        sentinels.cleanup()
