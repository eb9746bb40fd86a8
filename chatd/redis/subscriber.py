"""
The subscriber connection: a node's sharded pub/sub (``SSUBSCRIBE``), the
way it hears from the other nodes of the service.

Generic over channel names (bytes): what the channels are called and what
their payloads mean is the store's business (:mod:`chatd.store.notify`,
:mod:`chatd.store.layout`). A subscribed connection can do nothing else, so
it is a connection of its own.

A notification can be lost (the connection drops, the store restarts); so
on every (re)connection, once every channel is subscribed again, the
listener is told (``resubscribed``) and catches up from the store. The
connection is watched like Synapse's (``synapse/replication/tcp/redis.py``):
it PINGs every few seconds and is cut and reconnected when the answer is
later than the deadline (``--redis-timeout``), so a half-open connection is
noticed within seconds.
"""

import collections

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatd.redis import adapter
from chatd.redis.cluster import slot_of

#: seconds between PINGs on an idle subscriber connection
PING_EVERY = 3.0


class Subscriber:
    """One subscribed connection that follows the set of channels it is told
    to hold, across reconnections.

    ``listener`` gets ``notified(channel, payload)`` for each message,
    ``resubscribed()`` after a reconnection (once every channel is
    subscribed again: what was published meanwhile is lost), and
    ``moved(channel)`` when the store drops a channel unasked (its slot
    left that node of a cluster)."""

    log = Logger()

    def __init__(self, target, timeout, reactor, listener):
        self.target = target
        self.timeout = timeout
        self.reactor = reactor
        self.listener = listener
        self.count = collections.Counter()  # channel -> holders on this node
        # SSUBSCRIBEs written and confirmed per channel on this connection, and
        # who waits for which: [[confirmations needed, Deferred]]
        self._sent = collections.Counter()
        self._got = collections.Counter()
        self._waiters = collections.defaultdict(list)
        self._conn = None
        self._factory = None
        self._pinger = None
        self._ping_sent = None   # when the unanswered PING went out
        self._connections = 0

    # -- lifecycle ---------------------------------------------------------------

    def connect(self):
        self._factory = adapter.start_factory(adapter.SubscriberFactory, self.target, self.timeout, self.reactor,
                                      owner=self)
        self._pinger = task.LoopingCall(self._ping)
        self._pinger.clock = self.reactor
        self._pinger.start(min(PING_EVERY, self.timeout), now=False)
        return self

    def close(self):
        factory, self._factory = self._factory, None
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        waiters, self._waiters = self._waiters, collections.defaultdict(list)
        for waiting in waiters.values():
            for _, d in waiting:
                if not d.called:
                    d.errback(ConnectionError("the subscriber is closing"))
        if factory is None:
            return defer.succeed(None)
        return adapter.stop_factory(factory)

    @property
    def connected(self):
        return self._conn is not None

    # -- channels ----------------------------------------------------------------

    def subscribe(self, chan, holds=1):
        """Hold a channel; Deferred that fires once the store confirms it
        (at once if already held), or fails after the deadline (the caller
        may go on: the catch-up after the next reconnection covers it)."""
        self.count[chan] += holds
        if self._conn is not None:
            if self.count[chan] == holds:
                self._write(b"SSUBSCRIBE", chan)
                self._sent[chan] += 1
            elif self._got[chan] >= self._sent[chan]:
                return defer.succeed(None)
        d = defer.Deferred()
        self._waiters[chan].append([self._sent[chan], d])
        d.addTimeout(self.timeout, self.reactor)
        return d

    def unsubscribe(self, chan):
        """Drop one hold on a channel (unsubscribed when none is left)."""
        n = self.count[chan] - 1
        if n > 0:
            self.count[chan] = n
            return
        self.count.pop(chan, None)
        if self._conn is not None:
            self._write(b"SUNSUBSCRIBE", chan)

    def forget(self, chan):
        """Drop every hold on a channel (it moves to another shard's
        subscriber): how many there were, and the Deferreds still waiting
        for its confirmation (the new shard's confirmation fires them)."""
        n = self.count.pop(chan, 0)
        if n and self._conn is not None:
            self._write(b"SUNSUBSCRIBE", chan)
        return n, [d for _, d in self._waiters.pop(chan, [])]

    # -- the connection ----------------------------------------------------------

    def _write(self, *args):
        adapter.write(self._conn, *args)

    def _connected(self, conn):
        self._conn = conn
        self._connections += 1
        self._ping_sent = None
        if self._connections > 1:
            self.log.info("subscriber connection to the store is back; "
                          "subscribing {n} channels again", n=len(self.count))
        self._sent.clear()
        self._got.clear()
        # one command per channel: on Redis Cluster the channels of one
        # SSUBSCRIBE must share a slot
        for chan in self.count:
            self._write(b"SSUBSCRIBE", chan)
            self._sent[chan] = 1
        for chan in list(self._waiters):
            if chan not in self.count:
                del self._waiters[chan]  # given up on (unbound) meanwhile
                continue
            for w in self._waiters[chan]:
                w[0] = 1
        # when its confirmation comes, every channel before it is held
        if self._connections > 1:
            self._write(b"PING", b"resubscribed")

    def _lost(self, conn):
        if conn is not self._conn:
            return
        self._conn = None
        if self._factory is not None:
            self.log.warn("subscriber connection to the store lost; reconnecting "
                          "(notifications meanwhile are caught up from the inboxes)")

    def _reply(self, conn, reply):
        if not isinstance(reply, list) or not reply:
            if isinstance(reply, Exception):
                self.log.error("store error on the subscriber connection: {e}", e=reply)
            else:
                self._ping_sent = None  # a +PONG outside subscribed mode
            return
        kind = reply[0].lower()
        if kind == b"smessage" and len(reply) >= 3:
            self.listener.notified(reply[1], reply[2])
        elif kind == b"ssubscribe":
            chan = reply[1]
            self._got[chan] += 1
            waiting = self._waiters.get(chan)
            if waiting:
                ready = [d for need, d in waiting if need <= self._got[chan]]
                waiting[:] = [w for w in waiting if w[0] > self._got[chan]]
                if not waiting:
                    del self._waiters[chan]
                for d in ready:
                    if not d.called:
                        d.callback(None)
        elif kind == b"sunsubscribe" and len(reply) >= 2:
            # unasked for: the channel's slot left this node (Redis Cluster
            # tells shard-channel subscribers so); the listener re-routes it
            if reply[1] in self.count:
                self.listener.moved(reply[1])
        elif kind == b"pong":
            self._ping_sent = None
            if len(reply) > 1 and reply[1] == b"resubscribed":
                self.listener.resubscribed()

    # -- the watchdog --------------------------------------------------------------

    def _ping(self):
        conn = self._conn
        if conn is None:
            return
        now = self.reactor.seconds()
        if self._ping_sent is not None:
            if now - self._ping_sent >= self.timeout:
                self.log.warn("the store has not answered the subscriber's PING for "
                              "{t}s; reconnecting", t=self.timeout)
                self._ping_sent = None
                adapter.cut(conn)
            return
        self._ping_sent = now
        self._write(b"PING")


def subscriber(target, timeout, reactor, listener, client=None):
    """The subscriber for a store: one connection (a single store), or one
    per primary of a Redis Cluster (``client`` is its
    :class:`chatd.redis.cluster.ClusterClient`, which knows who owns which slot)."""
    if target.kind == "cluster":
        return ClusterSubscriber(client, timeout, reactor, listener)
    return Subscriber(target, timeout, reactor, listener)


class ClusterSubscriber:
    """A :class:`Subscriber` per primary of a Redis Cluster: ``SSUBSCRIBE``
    to a device's channel must go to the primary that owns its slot (where
    ``send.lua``'s ``SPUBLISH`` runs). It follows slot moves: when the
    topology changes, or a node says it dropped a channel (``sunsubscribe``
    after its slot left), the channel is subscribed again on its new owner,
    and once that is confirmed the listener catches up (``resubscribed``:
    what was published meanwhile went to the old owner)."""

    log = Logger()

    def __init__(self, client, timeout, reactor, listener):
        self.client = client
        self.timeout = timeout
        self.reactor = reactor
        self.listener = listener
        self.shards = {}   # (host, port) of a primary -> Subscriber
        self.where = {}    # channel -> (host, port) of the shard holding it
        self._closed = False

    def connect(self):
        self.client.listeners.append(self._topology_changed)
        for address in list(self.client.nodes):  # ready before the first bind
            self._open(address)
        return self

    def close(self):
        self._closed = True
        if self._topology_changed in self.client.listeners:
            self.client.listeners.remove(self._topology_changed)
        shards, self.shards = self.shards, {}
        return defer.DeferredList([s.close() for s in shards.values()])

    @property
    def connected(self):
        return bool(self.shards) and all(s.connected for s in self.shards.values())

    @property
    def count(self):
        out = collections.Counter()
        for s in self.shards.values():
            out.update(s.count)
        return out

    def _shard(self, chan):
        address = self.client.owner(slot_of(chan))
        if address is None:
            return None, None
        return address, self._open(address)

    def _open(self, address):
        shard = self.shards.get(address)
        if shard is None:
            shard = self.shards[address] = Subscriber(
                self.client.node_target(address), self.timeout, self.reactor, self).connect()
        return shard

    def subscribe(self, chan):
        address, shard = self._shard(chan)
        if shard is None:
            return defer.fail(ConnectionError("no primary of the cluster is known yet"))
        held = self.where.get(chan)
        if held is not None and held != address:
            self._move(chan, address, shard)
        self.where[chan] = address
        return shard.subscribe(chan)

    def unsubscribe(self, chan):
        address = self.where.get(chan)
        shard = self.shards.get(address)
        if shard is None:
            return
        shard.unsubscribe(chan)
        if chan not in shard.count:
            del self.where[chan]

    def _move(self, chan, address, shard):
        old = self.shards.get(self.where.get(chan))
        holds, waiting = old.forget(chan) if old is not None else (0, [])
        self.where[chan] = address
        if not holds:
            return None

        def settle(result):
            for d in waiting:
                if not d.called:
                    d.errback(result) if isinstance(result, Failure) else d.callback(None)
            return result
        return shard.subscribe(chan, holds).addBoth(settle)

    def _topology_changed(self):
        """Move every channel whose slot has a new owner; catch up once they
        are all subscribed there."""
        moved = []
        for address in list(self.client.nodes):
            self._open(address)
        for chan, held in list(self.where.items()):
            address, shard = self._shard(chan)
            if shard is not None and address != held:
                d = self._move(chan, address, shard)
                if d is not None:
                    moved.append(d)
        for address in list(self.shards):  # a former primary's, holding nothing now
            if address not in self.client.nodes and not self.shards[address].count:
                self.shards.pop(address).close()
        if moved:
            self.log.info("{n} notify channels moved to their slots' new owners", n=len(moved))
            dl = defer.DeferredList(moved, consumeErrors=True)
            dl.addCallback(lambda _: None if self._closed else self.listener.resubscribed())

    # -- each shard's listener -------------------------------------------------------

    def notified(self, chan, payload):
        self.listener.notified(chan, payload)

    def resubscribed(self):
        self.listener.resubscribed()

    def moved(self, chan):
        """A node dropped a channel (its slot left): read the topology."""
        self.client.refresh(soon=True)
