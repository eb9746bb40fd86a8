"""
What the nodes of one service tell each other through the store: each
device's notify channel (:func:`chatd.store.layout.channel`) and its
payloads (:func:`chatd.store.layout.parse_notice`), over the Redis layer's
subscriber connection(s) (:mod:`chatd.redis.subscriber`).

The hub's presence (:mod:`chatd.hub.presence`) holds a device's channel
while the device is bound on this node, and hears, per device:
``message(device, entry)``, ``kicked(device, epoch, node)``,
``revoked(device)``; and ``resubscribed()`` when notifications may have been
lost (it then catches up from the inboxes).
"""

from twisted.logger import Logger

from chatd.redis.subscriber import subscriber
from chatd.store import layout


class Notifications:
    """A node's notify channels, by device."""

    log = Logger()

    def __init__(self, target, timeout, reactor, client):
        self.listener = None
        self.subscriber = subscriber(target, timeout, reactor, self, client)

    def start(self, listener):
        self.listener = listener
        self.subscriber.connect()

    def close(self):
        return self.subscriber.close()

    @property
    def connected(self):
        return self.subscriber.connected

    def held(self):
        """{device: holds} of the channels held now."""
        return {layout.device_of(chan, layout.NOTIFY): n
                for chan, n in self.subscriber.count.items()}

    def subscribe(self, device):
        """Hold D's channel: Deferred that fires once the store confirms it."""
        return self.subscriber.subscribe(layout.channel(device))

    def unsubscribe(self, device):
        self.subscriber.unsubscribe(layout.channel(device))

    # -- the subscriber's listener ---------------------------------------------------

    def notified(self, chan, payload):
        device = layout.device_of(chan, layout.NOTIFY)
        what = layout.parse_notice(payload)
        if device is None or what is None:
            self.log.warn("unknown notification on {chan!r}: {p!r}", chan=chan[:80],
                          p=payload[:60])
            return
        kind, value = what
        if kind == "m":
            self.listener.message(device, value)
        elif kind == "k":
            self.listener.kicked(device, *value)
        else:
            self.listener.revoked(device)

    def resubscribed(self):
        self.listener.resubscribed()

    def moved(self, chan):
        """A single store dropped a channel unasked: not expected (a cluster's
        shards tell their own :class:`chatd.redis.subscriber.ClusterSubscriber`)."""
        self.log.warn("the store dropped the subscription of {chan!r}", chan=chan[:80])
