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
from twisted.logger import Logger

from chatd.store import layout

#: keys a SCAN step of the inbox sweeper looks at, per primary
SWEEP_COUNT = 1000


def scanners(client):
    """(name, client) of every store to SCAN: each primary of a Cluster,
    else the one store."""
    nodes = getattr(client, "nodes", None)
    if isinstance(nodes, dict):
        return list(nodes.items())
    return [("store", client)]


class InboxSteps:
    """Uses of the Store: ``client``, ``_ttl_ms``."""

    log = Logger()

    @defer.inlineCallbacks
    def inbox_ttl_pass(self, cursors, count=SWEEP_COUNT):
        """One bounded pass: on each primary, the next SCAN step (about
        ``count`` keys looked at) for inboxes, from its cursor in
        ``cursors`` (name -> cursor, kept between passes; a scan done starts
        again at 0), and those without a TTL given one. A primary that fails
        is skipped until the next pass. Deferred of (inboxes found, TTLs
        given)."""
        found = given = 0
        pattern = layout.pattern(layout.INBOX).encode("ascii")
        names = set()
        ttl = b"%d" % self._ttl_ms
        for name, store in scanners(self.client):
            names.add(name)
            try:
                cursor, keys = yield store.call(b"SCAN", cursors.get(name, b"0"), b"MATCH",
                                                pattern, b"COUNT", count, b"TYPE", b"list")
                cursors[name] = cursor
                found += len(keys)
                if keys:
                    done = yield defer.gatherResults(
                        [self.client.script("inbox_ttl", group, [ttl])
                         for group in self.client.split(keys, lambda k: k) if group],
                        consumeErrors=True)
                    given += sum(int(n) for n in done)
            except Exception as e:
                self.log.warn("giving inboxes their TTL on {node}: {why}", node=name, why=e)
        for name in set(cursors) - names:
            del cursors[name]  # a primary no longer
        return found, given
