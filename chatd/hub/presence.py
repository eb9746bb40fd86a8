"""
Many nodes, one service: which node holds each bound device, and what the
nodes tell each other (the hub's ``remote``).

A node binds a device in three steps: it subscribes to the device's notify
channel (:mod:`chatd.store.notify`) and waits for the store to confirm it; it
*claims* the device (``claim.lua``: the next epoch of ``chatd:{D}:epoch``,
the presence record ``chatd:{D}:node = "<node id> <epoch>"`` under a lease,
and a kick ``k <epoch> <node>`` on the channel if someone held it before);
then it binds the connection. Because every node subscribes before it
claims, every claim after its own reaches it as a kick; and a claim before
its own has a lower epoch and is kicked by it. So of any number of
simultaneous binds of one id on any number of nodes, exactly one stays: the
highest epoch. (A kick that arrives while this node's own claim is still on
its way is remembered, and the claim, if older, loses at once.)

Leases: a node renews the records of its bound devices every
``lease / 3`` (``renew.lua``, in batches). A record that is no longer its
own means a later bind elsewhere (a kick that was lost): that connection
is closed with ``session_replaced``. A node that dies stops renewing, and
its records run out ``--presence-lease`` (default 10 s) after its last
renewal at the latest. Until then, messages for its devices are published
to a channel nobody reads: nothing is lost, the inbox is the truth, and a
device that reconnects anywhere gets every unacked message.

The presence record is read by ``send.lua`` in the same step that stores a
message: a message for a device held by another node is published to that
node there, with no extra round trip.
"""

import secrets

from twisted.internet import defer, task
from twisted.logger import Logger

from chatd.errors import StoreUnavailable
from chatd.hub.binding import Superseded

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
        self.hub = None
        self._claiming = {}   # device -> claims on their way
        self._latest = {}     # device -> highest epoch heard while claiming
        self._renewer = None
        self._renewing = False

    def start(self, hub):
        self.hub = hub
        self.notifications.start(self)
        self._renewer = task.LoopingCall(self.renew)
        self._renewer.clock = self.reactor
        self._renewer.start(self.lease / 3, now=False)

    def stop(self):
        if self._renewer is not None and self._renewer.running:
            self._renewer.stop()
        return self.notifications.close()

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
                epoch = yield self.store.claim(device, self.lease_ms, token_hash, opened_ms)
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

    # -- leases ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def renew(self):
        """Renew every lease of this node; close what it has lost."""
        if self._renewing or self.hub is None:
            return
        self._renewing = True
        try:
            held = self.hub.held()
            for i in range(0, len(held), RENEW_BATCH):
                try:
                    lost, restored = yield self.store.renew(held[i:i + RENEW_BATCH],
                                                            self.lease_ms)
                except StoreUnavailable as e:
                    self.log.warn("cannot renew presence leases: {e}", e=e)
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
