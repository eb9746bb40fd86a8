"""
Who owns which slot of a Redis/Valkey Cluster, and a client per primary: the
topology half of :class:`chatd.redis.cluster.ClusterClient` (the routing half,
with the per-slot holds that keep call order, stays there).

* **Reading.** ``CLUSTER SLOTS`` is asked of the connected primaries, or,
  while none answers (the start, or every one is down), of the ``--redis``
  seeds and the replicas last seen, on connections that only read; the
  first answer wins. It is read every :data:`REFRESH_EVERY` seconds and at
  once (at most every :data:`MIN_REFRESH` seconds) after a redirection or a
  lost connection.
* **Applying.** Every primary named gets a
  :class:`chatd.redis.client.RedisClient` (made by
  ``make_client``, so every option of the store client holds for it);
  ``MOVED`` patches one slot's owner until the next reading. A former
  primary is *retired*, not closed: calls in flight on it are answered (the
  router holds its slots meanwhile), and it is closed at the next reading
  that does not name it again. The listeners hear of every change of owners.
* **Ready.** :meth:`Topology.when_connected` fires once the owners are known
  and every primary is connected; a first reading that leaves slots without a
  node is a :class:`ClusterError` (a start error naming ``--redis``).
"""

import dataclasses

from twisted.internet import defer, task
from twisted.logger import Logger

SLOTS = 16384
#: seconds between two readings of the topology (also read at once after a
#: redirection or a lost connection, at most every MIN_REFRESH seconds)
REFRESH_EVERY = 5.0
MIN_REFRESH = 0.2


class ClusterError(ValueError):
    """The cluster cannot serve chatd as it is (slots no node owns): a start
    error naming the option."""


class Topology:
    """The owner of every slot, as last read, and a client per primary.

    ``applied()`` is called after every reading applied (the router sends
    the calls made before any topology was known)."""

    # the namespace of the log lines from before the topology had a class
    log = Logger(namespace="chatd.redis.cluster.ClusterClient")

    def __init__(self, target, timeout, reactor, make_client, stats, applied):
        self.target = target
        self.timeout = timeout
        self.reactor = reactor
        # make_client(target, writes=True): the client of one node (writes:
        # a primary's, with the function library; else a seed asked only
        # for the topology)
        self.make_client = make_client
        self.stats = stats          # shared by every node's client
        self.applied = applied
        self.nodes = {}             # (host, port) -> RedisClient of a primary
        self._readers = {}          # while no primary answers: seeds, replicas
        self._others = set(target.seeds)  # addresses of those
        self._retired = {}          # former primaries, closed at the next reading
        self.owners = [None] * SLOTS   # as last read, patched by MOVED
        self._applied = None           # as last read
        self._reading = None        # the reading under way
        self._warned = None
        self._read_at = None
        self._ready = []
        self._error = None          # a ClusterError found at start
        self._loop = None
        self.listeners = []         # called with no argument after the owners changed
        self.closed = False

    # -- lifecycle -------------------------------------------------------------------

    def start(self):
        self._loop = task.LoopingCall(self.refresh)
        self._loop.clock = self.reactor
        self._loop.start(REFRESH_EVERY, now=False)

    def when_connected(self, timeout):
        """Deferred: True once the topology is known and every primary is
        connected, False after ``timeout``; fails with :class:`ClusterError`
        if the cluster leaves slots uncovered."""
        if self._error is not None:
            return defer.fail(self._error)
        if self._all_connected():
            return defer.succeed(True)
        d = defer.Deferred()
        self._ready.append(d)
        return d.addTimeout(timeout, self.reactor, onTimeoutCancel=lambda *_: False)

    def _all_connected(self):
        """The topology is known and every primary's connection is up."""
        return bool(self.nodes) and all(c.connected for c in self.nodes.values())

    def _check_ready(self):
        if not self._ready:
            return
        if self._error is not None:
            ready, self._ready = self._ready, []
            for d in ready:
                d.errback(self._error)
            return
        if self._all_connected():
            ready, self._ready = self._ready, []
            for d in ready:
                d.callback(True)

    def stop(self):
        """No more readings (the first step of closing)."""
        self.closed = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def close(self):
        """Stop; ``when_connected`` answers False; every client is closed."""
        self.stop()
        ready, self._ready = self._ready, []
        for d in ready:
            d.callback(False)
        clients = list(self.nodes.values()) + list(self._readers.values()) \
            + list(self._retired.values())
        self.nodes, self._readers, self._retired = {}, {}, {}
        return defer.DeferredList([c.close() for c in clients])

    # -- the nodes -------------------------------------------------------------------

    def owner(self, slot):
        """The (host, port) of the primary that owns a slot (None if unknown)."""
        return self.owners[slot]

    def node_target(self, address):
        """The RedisTarget of one node."""
        host, port = address
        return dataclasses.replace(self.target, host=host, port=port, kind="single", seeds=())

    def any(self):
        """A primary's client, a connected one if there is one (there must
        be a primary)."""
        for c in self.nodes.values():
            if c.connected:
                return c
        return next(iter(self.nodes.values()))

    def primary(self, address):
        """The client of a primary, made for a node an ASK or a MOVED named
        but the topology did not (yet)."""
        node = self.nodes.get(address)
        if node is None:
            node = self.nodes[address] = self._new_primary(address)
        return node

    def moved(self, slot, address):
        """A MOVED named the slot's new owner: note it until the next reading."""
        if address not in self.nodes:
            self.primary(address)
        self.owners[slot] = address

    def _new_primary(self, address):
        client = self.make_client(self.node_target(address))
        client.stats = self.stats
        client.connect()
        client.when_connected(self.timeout * 5).addCallback(lambda _: self._check_ready())
        return client

    # -- reading ---------------------------------------------------------------------

    def refresh(self, soon=False):
        """Read the topology (``CLUSTER SLOTS``) from the first node that
        answers; ``soon``: unless it was read less than MIN_REFRESH ago."""
        if self.closed or self._reading is not None:
            return
        now = self.reactor.seconds()
        if soon and self._read_at is not None and now - self._read_at < MIN_REFRESH:
            return
        self._read_at = now
        asked = [(a, c) for a, c in self.nodes.items() if c.connected]
        if not asked:
            # no primary answers (the start, or every one is down): ask the
            # seeds and the replicas last seen, on reading-only connections
            for address in self._others:
                if address not in self._readers:
                    self._readers[address] = self.make_client(
                        self.node_target(address), writes=False).connect()
            asked = list(self._readers.items()) + list(self.nodes.items())
        calls = [c.call(b"CLUSTER", b"SLOTS").addCallback(lambda r, a=a: (a, r))
                 for a, c in asked]
        # the first answer wins; errors are consumed (a list if none answers)
        first = defer.DeferredList(calls, fireOnOneCallback=True, consumeErrors=True)
        self._reading = first
        first.addCallback(self._read)
        first.addErrback(lambda f: self.log.failure("reading the cluster topology", f))

    def _read(self, result):
        self._reading = None
        if self.closed:
            return
        if not (isinstance(result, tuple) and result[0] is not None):
            now = self.reactor.seconds()
            if self._warned is None or now - self._warned >= 60:  # once a minute at most
                self._warned = now
                self.log.warn("no node of the cluster {c} answered CLUSTER SLOTS; "
                              "asking again", c=self.target.describe())
            return
        asked, reply = result[0]
        owner = [None] * SLOTS
        replicas = set()
        for row in reply:
            start, end, primary = int(row[0]), int(row[1]), row[2]
            address = self._address(primary, asked)
            for s in range(start, end + 1):
                owner[s] = address
            for r in row[3:]:
                replicas.add(self._address(r, asked))
        self._apply(owner, replicas)

    @staticmethod
    def _address(node, asked):
        host = node[0].decode("ascii") if isinstance(node[0], bytes) else node[0]
        if not host or host == "?":  # the node does not know its address: the one asked
            host = asked[0]
        return host, int(node[1])

    def _apply(self, owner, replicas):
        missing = owner.count(None)
        if missing:
            ranges = _ranges(owner)
            message = ("--redis %s: the cluster leaves %d of the 16384 slots without a "
                       "node (%s); assign them (CLUSTER ADDSLOTSRANGE) or wait for "
                       "cluster_state:ok" % (self.target.describe(), missing, ranges))
            if not self.nodes:
                self._error = ClusterError(message)
                self._check_ready()
                return
            self.log.warn("{message}", message=message)
        primaries = set(a for a in owner if a is not None)
        changed = owner != self._applied
        for address in list(self._retired):  # had a reading's time to finish
            if address not in primaries:
                self._retired.pop(address).close()
        for address in primaries:
            if address not in self.nodes:
                if address in self._retired:
                    self.nodes[address] = self._retired.pop(address)
                else:
                    self.nodes[address] = self._new_primary(address)
        for address in list(self.nodes):
            if address not in primaries:
                self._retired[address] = self.nodes.pop(address)
        self._others = (replicas | set(self.target.seeds)) - primaries
        readers, self._readers = self._readers, {}
        for reader in readers.values():
            reader.close()
        self.owners, self._applied = list(owner), owner
        if changed:
            self.log.info("cluster {c}: {n} primaries own the 16384 slots",
                          c=self.target.describe(), n=len(primaries))
            for listener in list(self.listeners):
                listener()
        self.applied()
        self._check_ready()


def _ranges(owner):
    """The uncovered slots as 'a-b, c-d' (at most a few ranges)."""
    out, start = [], None
    for s in range(SLOTS + 1):
        free = s < SLOTS and owner[s] is None
        if free and start is None:
            start = s
        elif not free and start is not None:
            out.append("%d-%d" % (start, s - 1) if s - 1 > start else "%d" % start)
            start = None
    return ", ".join(out[:4]) + (" ..." if len(out) > 4 else "")
