"""
Several nodes as real processes (``twistd -n chatd``) on one valkey-server:
what only real processes can show (SIGKILL of a node, ``--workers``).
"""

import os
import signal

import pytest
import pytest_twisted

from tests.clients import connect
from tests.fixtures.nodes import ChatdNodes, ChatdProcess
from tests.fixtures.procfs import children_of
from tests.helpers import wait_until

ensure = pytest_twisted.ensureDeferred

LEASE = 2.0


def presence(redis, device):
    value = redis.command("GET", "chatd:{%s}:node" % device)
    return value.decode().split()[0] if value else None


def node_id(proc):
    import re
    m = re.search(r"chatd node ([0-9a-f]+) starting", proc.log(since_start=True))
    return m.group(1)


@pytest.fixture
def nodes(own_redis, tmp_short):
    started = ChatdNodes(tmp_short, "--redis", own_redis.url, "--presence-lease", "%gs" % LEASE)
    yield started.start
    started.finish()


@pytest.mark.slow
@ensure
async def test_sigkill_of_the_node_holding_a_device_loses_nothing(nodes, opened, own_redis):
    a, b, c = await nodes(3)
    bob = await opened(b)
    token = await bob.register("bob")
    carol = await opened(b)
    await carol.register("carol")
    assert presence(own_redis, "bob") == node_id(b)
    alice = await opened(a)
    await alice.register("alice")
    for i in range(5):
        alice.send({"message": "before %d" % i, "receiver": "bob"})
        await alice.expect("accepted")
    pushed = [await bob.expect("message") for _ in range(5)]
    bob.send({"ack": pushed[1]["id"]})  # two acked, three pushed but not acked
    await wait_until(lambda: own_redis.command("LLEN", "chatd:{bob}:inbox") == 3)
    b.kill(signal.SIGKILL)
    await bob.wait_closed()
    for i in range(2):  # accepted while bob's node is dead (its lease still runs)
        alice.send({"message": "after %d" % i, "receiver": "bob"})
        await alice.expect("accepted")
    bob = await opened(c)
    r = await bob.reconnect("bob", token)
    assert r["pending"] == 5
    got = [await bob.expect("message") for _ in range(5)]
    assert [m["id"] for m in got[:3]] == [p["id"] for p in pushed[2:]]
    assert [m["message"] for m in got[3:]] == ["after 0", "after 1"]
    assert presence(own_redis, "bob") == node_id(c)
    # live on C; the dead node's other device is free once its lease ran out
    alice.send({"message": "live", "receiver": "bob"})
    await alice.expect("accepted")
    await bob.expect("message", message="live")
    await wait_until(lambda: own_redis.command("EXISTS", "chatd:{carol}:node") == 0,
                     timeout=LEASE + 10, what="the dead node's presence record expiring")
    assert own_redis.command("EXISTS", "chatd:{bob}:node") == 1


def worker_pids(proc):
    """The worker processes of a --workers chatd (its children but the store)."""
    out = []
    for pid in children_of(proc.pid):
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                if b"chatd.app.worker" in f.read():
                    out.append(pid)
        except OSError:
            pass
    return out


def listen_backlogs(port):
    """The backlog of every socket listening on 127.0.0.1:port (``ss``
    shows it as the Send-Q of a listening socket)."""
    import subprocess
    out = subprocess.run(["ss", "-ltnH", "sport", "=", ":%d" % port], capture_output=True,
                         text=True, check=True).stdout
    return sorted(int(line.split()[2]) for line in out.splitlines() if line.strip())


@pytest.mark.slow
@ensure
async def test_workers_share_the_port_and_a_killed_worker_loses_nothing(tmp_short):
    """``--workers 2`` on the embedded store: connections to the one port
    land on both processes (two node ids hold devices); the --websocket
    listener is shared too (it used to fail in the worker with "Address
    already in use", and restart forever), and every shared port listens
    with a backlog of 1024 (it was 50); SIGKILL of the worker loses nothing
    (its devices reconnect to the same port and get every message) and it is
    started again; SIGTERM stops everything."""
    import re

    from tests.fixtures.valkey import redis_command
    data = os.path.join(tmp_short, "data")
    proc = ChatdProcess(tmp_short, ["--workers", "2", "--port", "tcp:0:interface=127.0.0.1",
                                    "--websocket", "tcp:0:interface=127.0.0.1",
                                    "--data-dir", data, "--presence-lease", "2s"])
    conns = []
    try:
        port = await proc.start().await_listening()
        await wait_until(lambda: "chatd worker 1 listening" in proc.log()
                         and "chatd worker 1 web page on" in proc.log(), 30,
                         "the worker listening")
        # the parent accepted nothing before its worker listened (else the
        # first wave after a restart all lands on the parent)
        await wait_until(lambda: "chatd accepting on every process" in proc.log(), 30,
                         "the parent accepting")
        log = proc.log()
        assert log.index("accepting once the 1 workers listen") < log.index(
            "chatd worker 1 listening") < log.index(
            "chatd accepting on every process (every worker listens)"), log[-3000:]
        web = int(re.search(r"chatd web page on http://[\d.]+:(\d+)/", proc.log()).group(1))
        assert listen_backlogs(port) == [1024, 1024]
        assert listen_backlogs(web) == [1024, 1024]
        assert "ended" not in proc.log(), proc.log()[-3000:]
        store = lambda *a: redis_command(os.path.join(data, "valkey.sock"), *a)
        tokens = {}
        for i in range(40):
            c = await connect(port)
            conns.append(c)
            tokens["d%d" % i] = await c.register("d%d" % i)
        held = {}
        for i in range(40):
            held.setdefault(store("GET", "chatd:{d%d}:node" % i).split()[0], []).append(i)
        assert len(held) == 2, held  # both processes took connections
        [worker] = worker_pids(proc)
        parent_node = node_id(proc).encode()
        victims = [i for k, ids in held.items() if k != parent_node for i in ids]
        assert victims
        s = held[parent_node][0]  # the sender stays up: it is on the parent
        sender = conns[s]
        others = [i for i in range(40) if i != s]
        for i in others:
            sender.send({"message": "one for d%d" % i, "receiver": "d%d" % i})
        for i in others:
            await sender.expect("accepted")
        for i in others:
            await conns[i].expect("message", message="one for d%d" % i)
        os.kill(worker, signal.SIGKILL)
        for i in victims:
            await conns[i].wait_closed()
        for i in others:  # while the worker is down (or restarting)
            sender.send({"message": "two for d%d" % i, "receiver": "d%d" % i})
        for i in others:
            await sender.expect("accepted")
        for i in victims:
            c = conns[i] = await connect(port)
            conns.append(c)
            r = await c.reconnect("d%d" % i, tokens["d%d" % i])
            assert r["pending"] == 2  # the first one was never acked
            await c.expect("message", message="one for d%d" % i)
            await c.expect("message", message="two for d%d" % i)
        for i in others:
            if i not in victims:
                await conns[i].expect("message", message="two for d%d" % i)
        await wait_until(lambda: [p for p in worker_pids(proc) if p != worker], 30,
                         "the worker started again")
        await wait_until(lambda: proc.log().count("chatd worker 1 listening") == 2, 30,
                         "the new worker listening")
    finally:
        for c in conns:
            await c.close()
        code = proc.stop()
        leftover = worker_pids(proc) if proc.running else []
        proc.cleanup()
    assert code in (0, -signal.SIGTERM) and "Server Shut Down" in proc.log(), proc.log()[-3000:]
    assert leftover == []
    assert proc.bad_log_lines() == [], proc.log()[-3000:]
