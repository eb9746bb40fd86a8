"""
The nodes' side of presence, in the store: heartbeats, and the reaping of a
dead node's presence records. A mixin of :class:`chatd.store.steps.Store`
(the hub's use of it: :mod:`chatd.hub.presence`).

Why a heartbeat per node rather than a lease per record: a lease per record
costs a renewal per bound device per third of a lease, 24,000 store writes a
second at 80,000 idle phones (about a quarter of a core between the store
and the nodes, the whole of chatd's idle CPU but keepalive). A heartbeat is
one write per node; the records carry a long expiry only as a backstop, and
a node that finds another's heartbeat gone deletes that node's records
(:meth:`NodeSteps.reap`), as their lease running out used to.
"""

from twisted.internet import defer
from twisted.logger import Logger

from chatd.store import layout
from chatd.store.scans import scanners

#: keys a SCAN step of the reaper looks at
REAP_COUNT = 1000


class NodeSteps:
    """Uses of the Store: ``client``, ``node_id``."""

    log = Logger()

    def beat(self, lease_ms):
        """This node's heartbeat: Deferred of ``(was_alive, dead)``, whether
        its heartbeat was still there (False on the first beat, or after
        being cut off from the store for a whole lease), and the ids (bytes)
        of the dead nodes whose records this node is to reap (empty unless
        it holds the reaper lease: one node reaps at a time)."""
        d = self.client.script("beat", [layout.NODES, layout.live_key(self.node_id),
                                        layout.REAPER],
                               [self.node_id, lease_ms, 3 * lease_ms])
        return d.addCallback(lambda r: (bool(int(r[0])), list(r[1:])))

    def leave(self):
        """This node stops (gracefully): its heartbeat goes at once, so that
        a live node reaps whatever records it still has (a release that
        failed) without waiting a lease."""
        return self.client.call(b"DEL", layout.live_key(self.node_id))

    @defer.inlineCallbacks
    def reap(self, dead, count=REAP_COUNT):
        """Delete every presence record that names one of ``dead`` (node ids,
        bytes), then forget those nodes: Deferred of how many records went.
        One SCAN over the whole store (each primary), whatever the number of
        dead nodes; a record is deleted only if it is unchanged since it was
        read (``release.lua``), so a device bound again meanwhile keeps its
        new record. A failed step fails the whole reap: it is tried again."""
        names = tuple(n + b" " for n in dead)
        pattern = layout.pattern(layout.NODE).encode("ascii")
        removed = 0
        for _, store in scanners(self.client):
            cursor = b"0"
            while True:
                cursor, keys = yield store.call(b"SCAN", cursor, b"MATCH", pattern,
                                                b"COUNT", count, b"TYPE", b"string")
                if keys:
                    values = yield defer.gatherResults(
                        [self.client.call(b"GET", k) for k in keys], consumeErrors=True)
                    theirs = [(k, v) for k, v in zip(keys, values)
                              if v is not None and v.startswith(names)]
                    gone = yield defer.gatherResults(
                        [self.client.script("release", [k for k, _ in group],
                                            [v for _, v in group])
                         for group in self.client.split(theirs, lambda kv: kv[0])
                         if group], consumeErrors=True)
                    removed += sum(int(n) for n in gone)
                if cursor in (b"0", 0):
                    break
        yield self.client.call(b"SREM", layout.NODES, *dead)
        return removed
