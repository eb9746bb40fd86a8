"""
The inbox sweeper's step, in the store: giving an inbox that has no TTL the
TTL it would have had. A mixin of :class:`chatd.store.steps.Store` (run
periodically by :class:`chatd.hub.sweeper.InboxSweeper`).

Why inboxes without a TTL exist: ``send.lua`` sets an inbox's TTL only when
the inbox already held messages. When phones ack what they are pushed,
nearly every message makes a new inbox and its ack deletes it again, and a
TTL set on each was a tenth of the store's CPU per message and 15% of its
AOF bytes (README "Performance"). An inbox that keeps its one message (the
phone never came back) would then never expire; a bounded SCAN per pass
finds it and ``inbox_ttl.lua`` gives it the expiry of its newest message.
"""

from twisted.internet import defer

from chatd.store import layout
from chatd.store.scans import scan_step


class InboxSteps:
    """Uses of the Store: ``client``, ``_ttl_ms``."""

    def inbox_ttl_pass(self, cursors, count):
        """One bounded pass (:func:`chatd.store.scans.scan_step`) over the
        inboxes, those without a TTL given one: Deferred of (inboxes found,
        TTLs given)."""
        ttl = b"%d" % self._ttl_ms

        def give(keys):
            d = defer.gatherResults([self.client.script("inbox_ttl", group, [ttl])
                                     for group in self.client.split(keys, lambda k: k)
                                     if group], consumeErrors=True)
            return d.addCallback(lambda given: sum(int(n) for n in given))

        return scan_step(self.client, cursors, layout.INBOX, b"list", count, give,
                         "giving inboxes their TTL")
