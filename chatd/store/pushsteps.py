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

    def claim(self, devices, lease_ms, unacked_ms):
        """Claim the wake-ups of these devices that are due: Deferred of a
        list of :class:`Claimed`."""
        from twisted.internet import defer
        groups = self.client.split(list(devices), lambda dev: _keys(dev))
        calls = [self._claim(g, lease_ms, unacked_ms) for g in groups]
        d = defer.gatherResults(calls, consumeErrors=True)
        d.addErrback(lambda f: f.value.subFailure)
        return d.addCallback(lambda parts: [c for p in parts for c in p])

    def _claim(self, devices, lease_ms, unacked_ms):
        keys = []
        for dev in devices:
            p = _keys(dev)
            keys += [layout.device_due_key(dev, self.shards), p + layout.PUSH, p + layout.NODE,
                     p + layout.INBOX, p + layout.SEQ]
        d = self.client.script("push_claim", keys, [self._now_ms(), lease_ms, unacked_ms]
                               + [dev.encode("ascii") for dev in devices])

        def parse(r):
            return [Claimed(r[i].decode("ascii"), r[i + 1].decode("utf-8", "replace"),
                            r[i + 2].decode("ascii", "replace"), int(r[i + 3]), int(r[i + 4]),
                            r[i + 5]) for i in range(0, len(r), 6)]

        return d.addCallback(parse)

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

    def count_due(self):
        """How many wake-ups are in the due index (all shards)."""
        from twisted.internet import defer
        keys = [layout.due_key(s) for s in range(self.shards)]
        calls = [self.client.call(b"ZCARD", k) for k in keys]
        return defer.gatherResults(calls).addCallback(sum)
