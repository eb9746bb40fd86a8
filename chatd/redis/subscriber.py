"""
The subscriber connection: how a node hears about its bound devices from
the other nodes of the service.

Every device ``D`` has a sharded pub/sub channel ``chatd:{D}:notify``
(``SSUBSCRIBE``/``SPUBLISH``; the hash tag puts it in D's slot, so the same
code runs on Redis Cluster). A node subscribes to the channel of each
device bound on it, on a connection of its own (a subscribed connection can
do nothing else). Payloads, ASCII:

``m <push line>``
    A message was accepted for D: the push line is the inbox entry (its id
    inside). Published by ``send.lua``, in the step that stores the message,
    only when D's presence names another node. It is a hint: the inbox is
    the truth, and a node that sees a gap before that id reads the inbox.
``k <epoch> <node id>``
    D was bound (register or reconnect) on that node with that epoch
    (``claim.lua``): a node holding D with a lower epoch sends
    ``session_replaced`` and closes.
``revoked``
    The operator revoked D's tokens (``chatd-admin revoke D`` sets
    ``chatd:{D}:token`` to ``revoked`` first, then publishes this): the node
    holding D sends the error ``revoked`` and closes.

Anything else is logged and ignored (a newer node's payload).

A notification can be lost (the connection drops, the store restarts); so
on every (re)connection, once it has subscribed again, the node reads the
inbox of every device bound on it (:meth:`Presence.resubscribed`). The
connection is watched like Synapse's (``synapse/replication/tcp/redis.py``):
it PINGs every few seconds and is cut and reconnected when the answer is
later than the deadline (``--redis-timeout``), so a half-open connection is
noticed within seconds.
"""

import collections

import txredisapi
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatd.redis.client import ConnectionFactory, start_factory, stop_factory

#: seconds between PINGs on an idle subscriber connection
PING_EVERY = 3.0


def channel(device):
    return b"chatd:{%s}:notify" % device.encode("ascii")


def device_of(chan):
    """The device of a notify channel name (bytes), or None."""
    if chan.startswith(b"chatd:{") and chan.endswith(b"}:notify"):
        return chan[7:-8].decode("ascii", "replace")
    return None


def parse(payload):
    """A payload as ``(kind, value)``: ``("m", entry)``, ``("k", (epoch,
    node))``, ``("revoked", None)``; None if it is none of these."""
    if payload == b"revoked":
        return "revoked", None
    kind, _, rest = payload.partition(b" ")
    if kind == b"m" and rest:
        return "m", rest
    if kind == b"k":
        epoch, _, node = rest.partition(b" ")
        if epoch.isdigit():
            return "k", (int(epoch), node.decode("ascii", "replace"))
    return None


class _Protocol(txredisapi.SubscriberProtocol):
    """txredisapi does AUTH and SELECT; after that every reply is a pub/sub
    event for the :class:`Subscriber` (txredisapi knows only the unsharded
    ``message``/``subscribe``)."""

    def replyReceived(self, reply):
        if not self._ready:
            return super().replyReceived(reply)
        self.factory.owner._reply(self, reply)

    def connectionLost(self, why):
        super().connectionLost(why)
        self.factory.owner._lost(self)


class _Factory(ConnectionFactory):
    protocol = _Protocol


class Subscriber:
    """One subscribed connection that follows the set of channels it is told
    to hold, across reconnections.

    ``listener`` gets ``notified(device, payload)`` for each message and
    ``resubscribed()`` after a reconnection (once every channel is
    subscribed again: what was published meanwhile is lost)."""

    log = Logger()

    def __init__(self, target, timeout, reactor, listener):
        self.target = target
        self.timeout = timeout
        self.reactor = reactor
        self.listener = listener
        self.count = collections.Counter()  # device -> holders on this node
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
        self._factory = start_factory(_Factory, self.target, self.timeout, self.reactor,
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
        return stop_factory(factory)

    @property
    def connected(self):
        return self._conn is not None

    # -- channels ----------------------------------------------------------------

    def subscribe(self, device, holds=1):
        """Hold D's channel; Deferred that fires once the store confirms it
        (at once if already held), or fails after the deadline (the caller
        may go on: the catch-up after the next reconnection covers it)."""
        chan = channel(device)
        self.count[device] += holds
        if self._conn is not None:
            if self.count[device] == holds:
                self._write(b"SSUBSCRIBE", chan)
                self._sent[chan] += 1
            elif self._got[chan] >= self._sent[chan]:
                return defer.succeed(None)
        d = defer.Deferred()
        self._waiters[chan].append([self._sent[chan], d])
        d.addTimeout(self.timeout, self.reactor)
        return d

    def unsubscribe(self, device):
        """Drop one hold on D's channel (unsubscribed when none is left)."""
        n = self.count[device] - 1
        if n > 0:
            self.count[device] = n
            return
        self.count.pop(device, None)
        if self._conn is not None:
            self._write(b"SUNSUBSCRIBE", channel(device))

    def forget(self, device):
        """Drop every hold on D's channel (it moves to another shard's
        subscriber): how many there were, and the Deferreds still waiting
        for its confirmation (the new shard's confirmation fires them)."""
        n = self.count.pop(device, 0)
        if n and self._conn is not None:
            self._write(b"SUNSUBSCRIBE", channel(device))
        return n, [d for _, d in self._waiters.pop(channel(device), [])]

    # -- the connection ----------------------------------------------------------

    def _write(self, *args):
        self._conn.transport.write(self._conn._build_command(*args))

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
        for device in self.count:
            chan = channel(device)
            self._write(b"SSUBSCRIBE", chan)
            self._sent[chan] = 1
        held = {channel(device) for device in self.count}
        for chan in list(self._waiters):
            if chan not in held:
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
            device = device_of(reply[1])
            if device is not None:
                self.listener.notified(device, reply[2])
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
            device = device_of(reply[1])
            if device in self.count and hasattr(self.listener, "moved"):
                self.listener.moved(device)
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
                conn.transport.abortConnection()
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
        self.where = {}    # device -> (host, port) of the shard holding it
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

    def _shard(self, device):
        from chatd.redis.cluster import slot_of
        address = self.client.owner(slot_of(channel(device)))
        if address is None:
            return None, None
        return address, self._open(address)

    def _open(self, address):
        shard = self.shards.get(address)
        if shard is None:
            shard = self.shards[address] = Subscriber(
                self.client.node_target(address), self.timeout, self.reactor, self).connect()
        return shard

    def subscribe(self, device):
        address, shard = self._shard(device)
        if shard is None:
            return defer.fail(ConnectionError("no primary of the cluster is known yet"))
        held = self.where.get(device)
        if held is not None and held != address:
            self._move(device, address, shard)
        self.where[device] = address
        return shard.subscribe(device)

    def unsubscribe(self, device):
        address = self.where.get(device)
        shard = self.shards.get(address)
        if shard is None:
            return
        shard.unsubscribe(device)
        if device not in shard.count:
            del self.where[device]

    def _move(self, device, address, shard):
        old = self.shards.get(self.where.get(device))
        holds, waiting = old.forget(device) if old is not None else (0, [])
        self.where[device] = address
        if not holds:
            return None

        def settle(result):
            for d in waiting:
                if not d.called:
                    d.errback(result) if isinstance(result, Failure) else d.callback(None)
            return result
        return shard.subscribe(device, holds).addBoth(settle)

    def _topology_changed(self):
        """Move every channel whose slot has a new owner; catch up once they
        are all subscribed there."""
        moved = []
        for address in list(self.client.nodes):
            self._open(address)
        for device, held in list(self.where.items()):
            address, shard = self._shard(device)
            if shard is not None and address != held:
                d = self._move(device, address, shard)
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

    def notified(self, device, payload):
        self.listener.notified(device, payload)

    def resubscribed(self):
        self.listener.resubscribed()

    def moved(self, device):
        """A node dropped D's channel (its slot left): read the topology."""
        self.client.refresh(soon=True)
