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
  read again every :data:`chatd.redis.topology.REFRESH_EVERY` seconds and
  at once after a redirection or a lost connection: that, and a client per
  primary, is :class:`chatd.redis.topology.Topology`; this module routes.
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

from twisted.internet import defer, task
from twisted.python.failure import Failure

from chatd.errors import StoreUnavailable
from chatd.redis.client import Redirected, RedisClient
from chatd.redis.stats import StoreStats
from chatd.redis.topology import SLOTS, ClusterError, Topology

# ClusterError is raised by the topology, and imported from here
__all__ = ["ClusterClient", "ClusterError", "slot_of"]

#: first pause before retrying after TRYAGAIN / CLUSTERDOWN (doubling up to
#: MAX_PAUSE)
FIRST_PAUSE = 0.02
MAX_PAUSE = 0.25
#: commands that name no key (sent to any primary)
KEYLESS = frozenset([b"PING", b"TIME", b"INFO", b"CONFIG", b"FUNCTION", b"CLUSTER",
                     b"DBSIZE", b"WAIT"])


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
    """The routing of each call to the primary that owns its slot, with
    the holds that keep call order; the owners and the client of each
    primary are its :class:`Topology`."""

    #: keys of different slots live on different shards (see chatd.store.receipts)
    sharded = True

    def __init__(self, target, timeout, reactor, make_client=None):
        self.target = target
        self.timeout = timeout
        self.reactor = reactor
        self.stats = StoreStats()   # shared by every node's client
        self.topology = Topology(
            target, timeout, reactor,
            make_client or (lambda t, writes=True: RedisClient(t, timeout, reactor)),
            self.stats, self._route_unrouted)
        self._slots = {}            # slot -> _Slot
        self._unrouted = collections.deque()  # (slot, _Call) before any topology
        self._seq = 0
        self._watchdog = None

    @property
    def nodes(self):
        """(host, port) -> RedisClient of each primary."""
        return self.topology.nodes

    @property
    def listeners(self):
        """Called with no argument after the owners changed."""
        return self.topology.listeners

    @property
    def closed(self):
        return self.topology.closed

    # -- lifecycle -------------------------------------------------------------------

    def connect(self):
        self.topology.start()
        self._watchdog = task.LoopingCall(self._check_deadlines)
        self._watchdog.clock = self.reactor
        self._watchdog.start(min(self.timeout / 4, 0.25), now=False)
        self.topology.refresh()
        return self

    def when_connected(self, timeout):
        """Deferred: True once the topology is known and every primary is
        connected, False after ``timeout``; fails with :class:`ClusterError`
        if the cluster leaves slots uncovered."""
        return self.topology.when_connected(timeout)

    def close(self):
        self.topology.stop()
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
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
        return self.topology.close()

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
            return self.topology.any().call(*args) if self.nodes else defer.fail(
                StoreUnavailable("%s: no primary of the cluster is known yet"
                                 % args[0].decode("ascii", "replace")))
        return self._route(slot_of(args[1]), lambda c: c.call(*args), args[0])

    def config_get(self, name):
        """A setting as the first primary has it (None if it will not say)."""
        return self.topology.any().config_get(name) if self.nodes else defer.succeed(None)

    def late_ms(self, key=None):
        """See :meth:`RedisClient.late_ms`; asked of the node that owns
        ``key`` (the nodes' clocks may differ)."""
        node = self.nodes.get(self.topology.owners[slot_of(key)]) if key is not None else None
        if node is None:
            if not self.nodes:
                return b"0"
            node = self.topology.any()
        return node.late_ms()

    # -- the topology ----------------------------------------------------------------

    def refresh(self, soon=False):
        """Read the topology (``CLUSTER SLOTS``) from the first node that
        answers; ``soon``: unless it was read less than MIN_REFRESH ago."""
        self.topology.refresh(soon)

    def owner(self, slot):
        """The (host, port) of the primary that owns a slot (None if unknown)."""
        return self.topology.owners[slot]

    def node_target(self, address):
        """The RedisTarget of one node (for the subscriber connections)."""
        return self.topology.node_target(address)

    # -- routing ---------------------------------------------------------------------

    def _route(self, slot, run, name):
        self._seq += 1
        call = _Call(self._seq, run, self.reactor.seconds() + self.timeout, name)
        if not self.nodes:
            call.d = defer.Deferred()
            self._unrouted.append((slot, call))
            return call.d
        return self._route_call(slot, call)

    def _route_unrouted(self):
        """A topology was applied: send the calls made before any was known."""
        unrouted, self._unrouted = self._unrouted, collections.deque()
        for slot, call in unrouted:
            d = call.d
            self._route_call(slot, call).chainDeferred(d)

    def _route_call(self, slot, call):
        st = self._slots.get(slot)
        # held: a redirection is being sorted out, or the owner changed while
        # calls are in flight on the old one
        if st is not None and (st.queue is not None or
                               (st.inflight and st.node != self.topology.owners[slot])):
            call.d = defer.Deferred()
            if st.queue is None:
                st.queue = []
            st.queue.append(call)
            return call.d
        return self._dispatch(slot, call, st)

    def _dispatch(self, slot, call, st):
        topology = self.topology
        address = call.ask or topology.owners[slot]
        node = topology.nodes.get(address)
        if node is None:
            # an ASK to a node the topology did not name yet, or a slot
            # nobody owns (any primary answers with MOVED or CLUSTERDOWN)
            node = topology.primary(address) if call.ask else topology.any()
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
                self.topology.moved(slot, r.address)
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


def _text(what):
    return what.decode("ascii", "replace") if isinstance(what, bytes) else what
