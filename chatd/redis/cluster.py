"""
The store client for a Redis/Valkey Cluster (``--redis redis+cluster://...``):
the same calls as :class:`chatd.redis.client.RedisClient`, routed to the
primary that owns each call's slot.

txredisapi has no Cluster support (its issue #125) and no other Twisted client
has it, so the routing is written here, over one :class:`RedisClient` per
primary (made by ``make_client``, so that every option of the store client,
its deadlines, its function library loaded on every (re)connection, holds for
each primary). What this module adds:

* **Slots.** Every chatd key carries its device's hash tag ``{D}``; a call
  goes to the owner of ``CRC16(D) % 16384`` (:func:`slot_of`;
  ``binascii.crc_hqx`` is the CRC16 of the Cluster spec). The owners come
  from ``CLUSTER SLOTS``, asked of any node (the ``--redis`` seeds first),
  read again every :data:`REFRESH_EVERY` seconds and at once after a
  redirection or a lost connection.
* **Redirections.** ``MOVED`` (the slot has a new owner: noted, topology read
  again, call retried there), ``ASK`` (the slot is being migrated and this
  key is already on the importing node: ``ASKING`` and the call, written
  back to back on that node's one connection, so nothing comes between
  them), ``TRYAGAIN`` (a multi-key call met a slot half migrated) and
  ``CLUSTERDOWN`` (a failover is under way): retried after a short pause,
  all within the call's deadline (``--redis-timeout``), after which it fails
  as ``unavailable`` like any store call.
* **Order.** Calls of one slot are written in call order to one connection,
  which runs them in order. A redirected call did not run; calls written
  after it may have (different devices of the same slot) or may come back
  redirected too. So the first redirection *holds* the slot: calls made
  meanwhile wait, and once every call in flight for the slot is back, the
  redirected ones are sent again in their original order, then the waiting
  ones. The slot is free again once a round comes back without redirection.
  The same hold covers a slot whose owner changed while calls were in flight
  on the old one (a failover): nothing for that slot goes to the new owner
  before the old one has answered or failed. So messages of one connection
  to one receiver are stored in send order here too.

Batching is the store's business (:mod:`chatd.store.steps`): it splits a batch of
sends or acks by slot (:func:`slot_of`), and the calls for the slots of one
primary, made in one reactor turn, are pipelined on its connection.
"""

import binascii
import collections
import dataclasses

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatd.errors import StoreUnavailable
from chatd.redis.client import Redirected, RedisClient
from chatd.redis.stats import StoreStats

SLOTS = 16384
#: seconds between two readings of the topology (also read at once after a
#: redirection or a lost connection, at most every MIN_REFRESH seconds)
REFRESH_EVERY = 5.0
MIN_REFRESH = 0.2
#: first pause before retrying after TRYAGAIN / CLUSTERDOWN (doubling up to
#: MAX_PAUSE)
FIRST_PAUSE = 0.02
MAX_PAUSE = 0.25
#: commands that name no key (sent to any primary)
KEYLESS = frozenset([b"PING", b"TIME", b"INFO", b"CONFIG", b"FUNCTION", b"CLUSTER",
                     b"DBSIZE", b"WAIT"])


class ClusterError(ValueError):
    """The cluster cannot serve chatd as it is (slots no node owns): a start
    error naming the option."""


def slot_of(key):
    """The Cluster slot of a key (bytes): CRC16 of its hash tag (the part
    between the first ``{`` and the next ``}``, if not empty), else of the
    whole key."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    return binascii.crc_hqx(key, 0) & (SLOTS - 1)


class _Call:
    """One call on its way: how to run it on a node, until when, and where
    an ``ASK`` sent it."""

    __slots__ = ("seq", "run", "deadline", "d", "ask", "name")

    def __init__(self, seq, run, deadline, name):
        self.seq = seq
        self.run = run          # run(client) -> Deferred of the reply
        self.deadline = deadline
        self.d = None           # fired with the final result (held or retried)
        self.ask = None         # (host, port) of an ASK for the next try
        self.name = name


class _Slot:
    """The calls of one slot in flight, and those held back (see the module
    docstring). Kept once made (at most 16384 small objects): making one per
    call costs more."""

    __slots__ = ("node", "inflight", "queue", "retries", "pause", "last_pause", "timer")

    def __init__(self, node):
        self.node = node        # where the calls in flight went
        self.inflight = 0
        self.queue = None       # None: not held; else calls made while held
        self.retries = []       # redirected calls, to send again
        self.pause = 0.0        # TRYAGAIN/CLUSTERDOWN back-off of this round
        self.last_pause = 0.0   # ... and of the round before (it doubles)
        self.timer = None


class ClusterClient:
    """A :class:`RedisClient` per primary, and the routing between them."""

    log = Logger()

    def __init__(self, target, timeout, reactor, make_client=None):
        self.target = target
        self.timeout = timeout
        self.reactor = reactor
        # make_client(target, writes=True): the client of one node (writes:
        # a primary's, with the function library; else a seed asked only
        # for the topology)
        self.make_client = make_client or (
            lambda t, writes=True: RedisClient(t, timeout, reactor))
        self.stats = StoreStats()   # shared by every node's client
        self.nodes = {}             # (host, port) -> RedisClient of a primary
        self._readers = {}          # while no primary answers: seeds, replicas
        self._others = set(target.seeds)  # addresses of those
        self._retired = {}          # former primaries, closed at the next reading
        self._owner = [None] * SLOTS   # as last read, patched by MOVED
        self._applied = None           # as last read
        self._slots = {}            # slot -> _Slot
        self._unrouted = collections.deque()  # (slot, _Call) before any topology
        self._seq = 0
        self._reading = None        # the topology reading under way
        self._warned = None
        self._read_at = None
        self._ready = []
        self._error = None          # a ClusterError found at start
        self._loop = None
        self._watchdog = None
        self.listeners = []         # called with no argument after the owners changed
        self.closed = False

    # -- lifecycle -------------------------------------------------------------------

    def _node_target(self, address):
        host, port = address
        return dataclasses.replace(self.target, host=host, port=port, kind="single", seeds=())

    def connect(self):
        self._loop = task.LoopingCall(self.refresh)
        self._loop.clock = self.reactor
        self._loop.start(REFRESH_EVERY, now=False)
        self._watchdog = task.LoopingCall(self._check_deadlines)
        self._watchdog.clock = self.reactor
        self._watchdog.start(min(self.timeout / 4, 0.25), now=False)
        self.refresh()
        return self

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

    def close(self):
        self.closed = True
        for loop in (self._loop, self._watchdog):
            if loop is not None and loop.running:
                loop.stop()
        why = StoreUnavailable("the store client is closing")
        for st in list(self._slots.values()):
            if st.timer is not None and st.timer.active():
                st.timer.cancel()
            for call in st.retries + (st.queue or []):
                if not call.d.called:
                    call.d.errback(why)
        self._slots.clear()
        while self._unrouted:
            _, call = self._unrouted.popleft()
            call.d.errback(why)
        ready, self._ready = self._ready, []
        for d in ready:
            d.callback(False)
        clients = list(self.nodes.values()) + list(self._readers.values()) \
            + list(self._retired.values())
        self.nodes, self._readers, self._retired = {}, {}, {}
        return defer.DeferredList([c.close() for c in clients])

    # -- the calls of RedisClient ----------------------------------------------------

    def split(self, items, key):
        """``items`` in groups of one slot each (each in the order of
        ``items``; ``key(item)`` is its key): a Lua call may only touch keys
        of one slot on a cluster."""
        groups = {}
        for item in items:
            groups.setdefault(slot_of(key(item)), []).append(item)
        return list(groups.values())

    def script(self, name, keys, args):
        return self._route(slot_of(keys[0]), lambda c: c.script(name, keys, args), name)

    def call(self, *args):
        if args[0].upper() in KEYLESS or len(args) < 2:
            return self._any().call(*args) if self.nodes else defer.fail(
                StoreUnavailable("%s: no primary of the cluster is known yet"
                                 % args[0].decode("ascii", "replace")))
        return self._route(slot_of(args[1]), lambda c: c.call(*args), args[0])

    def config_get(self, name):
        """A setting as the first primary has it (None if it will not say)."""
        return self._any().config_get(name) if self.nodes else defer.succeed(None)

    def late_ms(self, key=None):
        """See :meth:`RedisClient.late_ms`; asked of the node that owns
        ``key`` (the nodes' clocks may differ)."""
        node = self.nodes.get(self._owner[slot_of(key)]) if key is not None else None
        if node is None:
            if not self.nodes:
                return b"0"
            node = self._any()
        return node.late_ms()

    def _any(self):
        for c in self.nodes.values():
            if c.connected:
                return c
        return next(iter(self.nodes.values()))

    # -- routing ---------------------------------------------------------------------

    def _route(self, slot, run, name):
        self._seq += 1
        call = _Call(self._seq, run, self.reactor.seconds() + self.timeout, name)
        if not self.nodes:
            call.d = defer.Deferred()
            self._unrouted.append((slot, call))
            return call.d
        return self._route_call(slot, call)

    def _dispatch(self, slot, call, st):
        address = call.ask or self._owner[slot]
        node = self.nodes.get(address)
        if node is None:
            # an ASK to a node the topology did not name yet, or a slot
            # nobody owns (any primary answers with MOVED or CLUSTERDOWN)
            node = self._primary(address) if call.ask else self._any()
        if st is None:
            st = self._slots[slot] = _Slot(address)
        st.node = address
        st.inflight += 1
        if call.ask:
            # the same connection, directly before the call: nothing can come
            # between them (both are written in this turn of the reactor)
            node.call(b"ASKING").addErrback(lambda f: None)
        d = call.run(node)
        d.addBoth(self._returned, slot, call)
        return d

    def _primary(self, address):
        """A client for a node an ASK named but the topology did not (yet)."""
        node = self.nodes.get(address)
        if node is None:
            node = self.nodes[address] = self._new_primary(address)
        return node

    def _returned(self, result, slot, call):
        st = self._slots.get(slot)
        if st is None:  # closed meanwhile
            return result
        st.inflight -= 1
        if isinstance(result, Failure):
            if result.check(Redirected):
                return self._redirected(result.value, slot, call, st)
            if result.check(StoreUnavailable):
                self.refresh(soon=True)  # the node may be gone
        if st.inflight == 0 and st.queue is not None:
            self._release_later(slot, st)
        return result

    def _redirected(self, r, slot, call, st):
        redirects = self.stats.redirects
        redirects[r.kind] = redirects.get(r.kind, 0) + 1
        if r.kind == "MOVED":
            if r.address is not None:
                if r.address not in self.nodes:
                    self._primary(r.address)
                self._owner[slot] = r.address
            self.refresh(soon=True)
            call.ask = None
        elif r.kind == "ASK":
            call.ask = r.address
        else:  # TRYAGAIN, CLUSTERDOWN: the same place, a little later
            call.ask = None
            st.pause = min(MAX_PAUSE, max(st.last_pause * 2, FIRST_PAUSE))
            if r.kind == "CLUSTERDOWN":
                self.refresh(soon=True)
        if st.queue is None:
            st.queue = []
        call.d = defer.Deferred()
        st.retries.append(call)
        if st.inflight == 0:
            self._release_later(slot, st)
        return call.d

    def _release_later(self, slot, st):
        if st.timer is not None:
            return
        if st.pause:
            st.timer = self.reactor.callLater(st.pause, self._release, slot)
        else:
            self._release(slot)

    def _release(self, slot):
        """Every call of a held slot is back: send the redirected ones again
        in their order, then those that waited; the slot is free once a
        round comes back clean."""
        st = self._slots.get(slot)
        if st is None:
            return
        st.timer = None
        if st.inflight:
            return
        pending = sorted(st.retries, key=lambda c: c.seq) + (st.queue or [])
        st.retries = []
        if not pending:
            st.queue, st.last_pause = None, 0.0  # free again
            return
        st.queue = []
        st.last_pause, st.pause = st.pause, 0.0
        now = self.reactor.seconds()
        for call in pending:
            if call.deadline <= now:
                self._expire(call)
            else:
                self._dispatch(slot, call, st).chainDeferred(call.d)
        if st.inflight == 0 and st.queue == [] and not st.retries:
            st.queue, st.last_pause = None, 0.0

    def _expire(self, call):
        self.stats.unavailable += 1
        if not call.d.called:
            call.d.errback(StoreUnavailable(
                "%s: the cluster did not settle within %gs (slot moving or failing "
                "over); nothing was stored" % (_text(call.name), self.timeout)))

    def _check_deadlines(self):
        now = self.reactor.seconds()
        while self._unrouted and self._unrouted[0][1].deadline <= now:
            self._expire(self._unrouted.popleft()[1])
        for st in list(self._slots.values()):
            if st.queue:
                keep = [c for c in st.queue if c.deadline > now]
                for c in st.queue:
                    if c.deadline <= now:
                        self._expire(c)
                st.queue[:] = keep
            if st.retries and st.timer is not None:
                keep = [c for c in st.retries if c.deadline > now]
                for c in st.retries:
                    if c.deadline <= now:
                        self._expire(c)
                st.retries = keep

    # -- topology --------------------------------------------------------------------

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
                        self._node_target(address), writes=False).connect()
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
        self._owner, self._applied = list(owner), owner
        if changed:
            self.log.info("cluster {c}: {n} primaries own the 16384 slots",
                          c=self.target.describe(), n=len(primaries))
            for listener in list(self.listeners):
                listener()
        unrouted, self._unrouted = self._unrouted, collections.deque()
        for slot, call in unrouted:
            d = call.d
            self._route_call(slot, call).chainDeferred(d)
        self._check_ready()

    def _route_call(self, slot, call):
        st = self._slots.get(slot)
        # held: a redirection is being sorted out, or the owner changed while
        # calls are in flight on the old one
        if st is not None and (st.queue is not None or
                               (st.inflight and st.node != self._owner[slot])):
            call.d = defer.Deferred()
            if st.queue is None:
                st.queue = []
            st.queue.append(call)
            return call.d
        return self._dispatch(slot, call, st)

    def _new_primary(self, address):
        client = self.make_client(self._node_target(address))
        client.stats = self.stats
        client.connect()
        client.when_connected(self.timeout * 5).addCallback(lambda _: self._check_ready())
        return client

    def owner(self, slot):
        """The (host, port) of the primary that owns a slot (None if unknown)."""
        return self._owner[slot]

    def node_target(self, address):
        """The RedisTarget of one node (for the subscriber connections)."""
        return self._node_target(address)


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


def _text(what):
    return what.decode("ascii", "replace") if isinstance(what, bytes) else what
