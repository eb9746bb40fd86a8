"""
Many nodes, one service: which node holds each bound device, and what the
nodes tell each other (the hub's ``remote``).

A node binds a device in three steps: it subscribes to the device's notify
channel (:mod:`chatd.store.notify`) and waits for the store to confirm it; it
*claims* the device (``claim.lua``: the next epoch of ``chatd:{D}:epoch``,
the presence record ``chatd:{D}:node = "<node id> <epoch>"``,
and a kick ``k <epoch> <node>`` on the channel if someone held it before);
then it binds the connection. Because every node subscribes before it
claims, every claim after its own reaches it as a kick; and a claim before
its own has a lower epoch and is kicked by it. So of any number of
simultaneous binds of one id on any number of nodes, exactly one stays: the
highest epoch. (A kick that arrives while this node's own claim is still on
its way is remembered, and the claim, if older, loses at once.)

Liveness: every node writes a heartbeat every ``lease / 3`` (``beat.lua``,
one store call, whatever the number of devices it holds; ``lease`` is
``--presence-lease``, default 10 s). A node whose heartbeat has run out is
dead: one live node (the reaper, a lease of its own) deletes every presence
record that names it (:meth:`chatd.store.nodes.NodeSteps.reap`, one SCAN of
the store), so a dead node's devices are free about a lease after its last
heartbeat, as they were when each record had its own lease. Until then,
messages for its devices are published to a channel nobody reads: nothing
is lost, the inbox is the truth, and a device that reconnects anywhere gets
every unacked message.

The records themselves expire only as a backstop, after
:data:`~chatd.store.layout.RECORD_LEASES` leases; each tick the node renews
a slice of its records (``renew.lua``), so that each is renewed three times
within its expiry. At 80,000 idle devices the per-record leases this
replaces cost 24,000 renewals a second. A renewal also finds records that
are no longer this node's (a later bind elsewhere whose kick was lost): that
connection is closed with ``session_replaced``; and records that went
missing while the device is still this node's, which it writes again. Every
record is checked at once when the notifications were resubscribed (kicks
may have been lost) and when this node finds its own heartbeat gone (it was
cut off from the store for a whole lease, and may have been reaped; it
checks again a lease later, after a reap still running).

"""

import secrets

from twisted.internet import defer, task
from twisted.logger import Logger

from chatd.errors import StoreUnavailable
from chatd.hub.binding import Superseded
from chatd.store.layout import RECORD_LEASES

#: most devices renewed in one store call (about a millisecond of the store)
RENEW_BATCH = 500


def new_node_id():
    """A random node id (12 hex digits): a fresh one on every start, so a
    restarted node never mistakes an old record for its own."""
    return secrets.token_hex(6)


class Presence:
    """The hub's ``remote``: claims, leases and notifications of one node."""

    log = Logger()

    def __init__(self, store, notifications, settings, reactor):
        self.store = store
        self.notifications = notifications  # chatd.store.notify.Notifications
        self.reactor = reactor
        self.lease = settings.presence_lease
        self.lease_ms = int(self.lease * 1000)
        #: a presence record's expiry (a backstop, see above)
        self.record_ms = RECORD_LEASES * self.lease_ms
        self.hub = None
        self._claiming = {}   # device -> claims on their way
        self._latest = {}     # device -> highest epoch heard while claiming
        self._ticker = None
        self._renewing = False
        self._beats = 0        # heartbeats stored
        self._round = []       # the devices of this round of renewals
        self._slice = 0        # where the next slice of it starts
        self._reaping = None   # the reap in flight
        self._again = None     # the check a lease after a lost heartbeat
        self.reaped = 0        # records of dead nodes deleted here

    def start(self, hub):
        self.hub = hub
        self.notifications.start(self)
        self._ticker = task.LoopingCall(self.tick)
        self._ticker.clock = self.reactor
        self._ticker.start(self.lease / 3, now=True)

    @defer.inlineCallbacks
    def stop(self):
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        if self._again is not None and self._again.active():
            self._again.cancel()
        if self._beats:
            # a live node reaps what a failed release left, without a lease's wait
            yield self.store.leave().addErrback(lambda f: None)
        yield self.notifications.close()

    # -- the hub's side --------------------------------------------------------------

    @defer.inlineCallbacks
    def claim(self, device, token_hash=None, opened_ms=None):
        """Subscribe, then claim D for this node: Deferred of its epoch.
        Fails with StoreUnavailable (nothing held), or Superseded."""
        self._claiming[device] = self._claiming.get(device, 0) + 1
        try:
            try:
                yield self.notifications.subscribe(device)
            except Exception as e:
                # go on: a lost kick is found by the next renewal, a lost
                # message by the catch-up after the subscriber reconnects
                self.log.warn("subscribing to {device}'s notifications: {e!r}",
                              device=device, e=e)
            try:
                epoch = yield self.store.claim(device, self.record_ms, token_hash, opened_ms)
            except Exception:
                self.notifications.unsubscribe(device)
                raise
            if epoch < 0 or self._latest.get(device, 0) > epoch:
                # a later bind elsewhere, or (epoch -1) the token this bind was
                # given was rotated away by another reconnect since, or (-2) a
                # connection opened after this one holds the device
                self.notifications.unsubscribe(device)
                raise Superseded(device)
            return epoch
        finally:
            n = self._claiming.pop(device) - 1
            if n:
                self._claiming[device] = n
            else:
                self._latest.pop(device, None)

    def release(self, device, epoch):
        """D's connection here is gone (epoch as claimed)."""
        self.notifications.unsubscribe(device)
        self.store.release(device, epoch).addErrback(lambda f: None)

    def deliver(self, receiver, server_id, entry):
        """Nothing to do: send.lua has published the message already."""

    # -- heartbeats, reaping and renewals ----------------------------------------------

    @defer.inlineCallbacks
    def tick(self):
        """Every lease / 3: the heartbeat; the reap of dead nodes, if this
        node is the reaper; a slice of this node's records renewed."""
        try:
            alive, dead = yield self.store.beat(self.lease_ms)
        except Exception as e:  # StoreUnavailable, or a Cluster's error: next tick
            self.log.warn("cannot write this node's heartbeat: {e}", e=e)
            return
        if not alive and self._beats:
            self.log.warn("this node's heartbeat had run out (cut off from the store "
                          "for {lease}s?): checking every presence record", lease=self.lease)
            self.renew()
            if self._again is None or not self._again.active():
                self._again = self.reactor.callLater(self.lease, self.renew)
        self._beats += 1
        if dead and self._reaping is None:
            self._reap(dead)
        yield self._renew_slice()

    def _reap(self, dead):
        def done(n):
            self.reaped += n
            self.log.info("dead node(s) {nodes}: {n} presence record(s) deleted",
                          nodes=b", ".join(dead).decode("ascii", "replace"), n=n)

        def failed(f):
            self.log.warn("reaping dead node(s): {e}", e=f.getErrorMessage())

        def over(_):
            self._reaping = None

        d = self._reaping = self.store.reap(dead)
        d.addCallbacks(done, failed).addBoth(over)

    def _renew_slice(self):
        """The next 1/RECORD_LEASES of this node's records (at least one):
        of the devices bound here when this round began (one bound since
        has a fresh record)."""
        if self._renewing:  # (a check of every record is on its way)
            return None
        if self._slice >= len(self._round):
            self._round, self._slice = self.hub.held(), 0
            if not self._round:
                return None
        n = -(-len(self._round) // RECORD_LEASES)
        part = self._round[self._slice:self._slice + n]
        self._slice += n
        return self.renew(part)

    def _still_held(self, held):
        """Those of ``held`` still bound here with that epoch. A record is
        renewed only in the reactor turn that checked this: the release of
        a device gone since goes to the store after it, in order, so a
        renewal never writes back a record just released (for a whole
        record expiry)."""
        sessions = self.hub.sessions
        return [(device, epoch) for device, epoch in held
                if getattr(sessions.get(device), "epoch", None) == epoch]

    @defer.inlineCallbacks
    def renew(self, held=None):
        """Renew the records of ``held`` (every device bound here if None);
        close what this node has lost."""
        if self._renewing or self.hub is None:
            return
        self._renewing = True
        try:
            if held is None:
                held = self.hub.held()
            for i in range(0, len(held), RENEW_BATCH):
                part = self._still_held(held[i:i + RENEW_BATCH])
                if not part:
                    continue
                try:
                    lost, restored = yield self.store.renew(part, self.record_ms)
                except Exception as e:  # StoreUnavailable, or a Cluster's error
                    self.log.warn("cannot renew presence records: {e}", e=e)
                    return
                for device, epoch in lost:
                    self.hub.replaced(device, epoch)
                # messages stored while their record was missing were not
                # published here: read those inboxes
                self.hub.catch_up([device for device, _ in restored])
        finally:
            self._renewing = False

    # -- the notifications' listener ------------------------------------------------

    def message(self, device, entry):
        self.hub.notified(device, entry)

    def kicked(self, device, epoch, node):
        if device in self._claiming and epoch > self._latest.get(device, 0):
            self._latest[device] = epoch
        self.hub.replaced(device, epoch, newer=True, where=node)

    def revoked(self, device):
        self.hub.revoke(device)

    def resubscribed(self):
        """Notifications may have been lost: read every bound inbox, and
        check every lease (a kick may have been lost too)."""
        self.hub.catch_up()
        self.renew()
