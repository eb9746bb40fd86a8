"""
Walks over the store's keys for the background jobs (the reaper, the
sweepers): on every primary of a Redis Cluster, else on the one store.
"""

from twisted.internet import defer
from twisted.logger import Logger

from chatd.store import layout

log = Logger()


def scanners(client):
    """(name, client) of every store to SCAN: each primary of a Cluster,
    else the one store."""
    nodes = getattr(client, "nodes", None)
    if isinstance(nodes, dict):
        return list(nodes.items())
    return [("store", client)]


@defer.inlineCallbacks
def scan_step(client, cursors, suffix, kind, count, each, what):
    """One bounded pass of a sweeper: on each primary, the next SCAN step
    (about ``count`` keys looked at) for the keys ``chatd:{*}:<suffix>`` of
    type ``kind``, from its cursor in ``cursors`` (name -> cursor, kept
    between passes; a scan done starts again at 0), and ``each(keys)``, a
    Deferred of a number, on the keys it found. A primary that fails is
    logged (``what`` it was doing) and skipped until the next pass. Deferred
    of (keys found, the sum of the numbers)."""
    found = total = 0
    pattern = layout.pattern(suffix).encode("ascii")
    names = set()
    for name, store in scanners(client):
        names.add(name)
        try:
            cursor, keys = yield store.call(b"SCAN", cursors.get(name, b"0"), b"MATCH",
                                            pattern, b"COUNT", count, b"TYPE", kind)
            cursors[name] = cursor
            found += len(keys)
            if keys:
                total += yield each(keys)
        except Exception as e:
            log.warn("{what} on {node}: {why}", what=what, node=name, why=e)
    for name in set(cursors) - names:
        del cursors[name]  # a primary no longer
    return found, total
