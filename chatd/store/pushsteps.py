"""
The store steps of push wake-ups (contract 1.2, "Push wake-ups"): set or
remove a registration, find and claim due wake-ups, note their outcome. Each
one atomic Lua function (``push_*.lua``); the keys are
:mod:`chatd.store.layout`'s.

How a wake-up travels (see layout's ``push`` and ``pushdue``):

1. ``send.lua`` stores a message and, in the same step, puts the receiver in
   its shard of the due index, scored by when its wake-up may be claimed.
   The due index is sharded, and on Redis Cluster a device's shard is the
   one whose key lies in the device's own slot, so this is one atomic step
   there too: a node killed right after ``accepted`` loses no wake-up.
2. A node claims it (``push_claim.lua``): the checks of the contract (still
   registered, still away, something waiting) and a lease, in one step; an
   entry under lease is scored at the lease's end, so if the claimer dies
   another node's scan claims it once the lease has run out.
3. The node calls the gateway, then ends the claim (``push_done.lua``):
   removed, or due again (coalescing, retries).
"""

from chatd.store import layout
from chatd.store.layout import prefix as _keys


class Claimed:
    """A wake-up claimed by this node."""

    __slots__ = ("device", "pushkey", "app", "ts", "unread", "newest")

    def __init__(self, device, pushkey, app, ts, unread, newest):
        self.device = device
        self.pushkey = pushkey
        self.app = app
        self.ts = ts
        self.unread = unread
        self.newest = newest


class PushSteps:
    def __init__(self, store):
        self.store = store
        self.client = store.client
        self.shards = store.due_shards

    def _now_ms(self):
        return self.store._now_ms()

    def set(self, device, pushkey, app, now):
        """Store D's push registration (pushkey "" removes it)."""
        return self.client.script("push_set", [_keys(device) + layout.PUSH], [
            pushkey.encode("utf-8"), (app or "").encode("ascii"), b"%d" % int(now)])

    def get(self, device):
        """D's push registration and wake-up state as a dict of str (empty:
        none)."""
        d = self.client.call(b"HGETALL", _keys(device) + layout.PUSH)

        def parse(r):
            if isinstance(r, dict):
                items = r.items()
            else:
                items = zip(r[::2], r[1::2])
            return {k.decode() if isinstance(k, bytes) else k: v for k, v in items}

        return d.addCallback(parse)

    def scan(self, shards, limit=100):
        """Ids due now in these shards (Deferred of a list of str), one call
        per group the store may take at once."""
        from twisted.internet import defer
        keys = [layout.due_key(s) for s in shards]
        now = self._now_ms()
        calls = [self.client.script("push_scan", group, [now, limit])
                 for group in self.client.split(keys, lambda k: k)]
        d = defer.gatherResults(calls, consumeErrors=True)
        d.addErrback(lambda f: f.value.subFailure)
        return d.addCallback(lambda parts: [x.decode("ascii") for p in parts for x in p])

    def _grouped(self, devices, call):
        """``call(group)`` for each group of devices one store call may
        take: Deferred of the list of their results."""
        from twisted.internet import defer
        groups = self.client.split(list(devices), lambda dev: _keys(dev))
        d = defer.gatherResults([call(g) for g in groups], consumeErrors=True)
        return d.addErrback(lambda f: f.value.subFailure)

    def claim(self, devices, lease_ms, unacked_ms):
        """Claim the wake-ups of these devices that are due: Deferred of
        ``(claimed, later)``: a list of :class:`Claimed`, and [(device, ms)]
        of those whose wake-up is now due later (push_claim.lua)."""
        d = self._grouped(devices, lambda g: self._claim(g, lease_ms, unacked_ms))
        return d.addCallback(lambda parts: ([c for p in parts for c in p[0]],
                                            [x for p in parts for x in p[1]]))

    def _claim(self, devices, lease_ms, unacked_ms):
        keys = []
        for dev in devices:
            p = _keys(dev)
            keys += [layout.device_due_key(dev, self.shards), p + layout.PUSH, p + layout.NODE,
                     p + layout.INBOX, p + layout.SEQ]
        d = self.client.script("push_claim", keys, [self._now_ms(), lease_ms, unacked_ms,
                                                    self.store.node_id]
                               + [dev.encode("ascii") for dev in devices])

        def parse(r):
            out, later = r
            return ([Claimed(out[i].decode("ascii"), out[i + 1].decode("utf-8", "replace"),
                             out[i + 2].decode("ascii", "replace"), int(out[i + 3]),
                             int(out[i + 4]), out[i + 5]) for i in range(0, len(out), 6)],
                    [(later[i].decode("ascii"), int(later[i + 1]))
                     for i in range(0, len(later), 2)])

        return d.addCallback(parse)

    def renew(self, devices, lease_ms):
        """Renew this node's leases on these devices' wake-ups."""
        def call(group):
            keys = []
            for dev in group:
                keys += [layout.device_due_key(dev, self.shards), _keys(dev) + layout.PUSH]
            return self.client.script("push_renew", keys, [
                self._now_ms(), lease_ms, self.store.node_id] +
                [dev.encode("ascii") for dev in group])
        return self._grouped(devices, call)

    def done(self, claimed, outcome, interval_ms, retry_for_ms, backoff_ms=1000):
        """End a claim: Deferred of ``(result, retry_ms)``: the result to
        count (sent, rejected, retried, dropped, failed) and, for retried,
        the delay until it is due again."""
        dev = claimed.device
        p = _keys(dev)
        d = self.client.script("push_done", [
            layout.device_due_key(dev, self.shards), p + layout.PUSH, p + layout.SEQ,
            p + layout.INBOX], [
            dev.encode("ascii"), self._now_ms(), outcome.encode("ascii"),
            claimed.pushkey.encode("utf-8"), interval_ms, retry_for_ms, backoff_ms])

        def parse(r):
            result, _, delay = r.decode("ascii").partition(" ")
            return result, (int(float(delay)) if delay else None)

        return d.addCallback(parse)
