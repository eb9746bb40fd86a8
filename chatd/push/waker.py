"""
Which wake-ups this node sends, and when (:class:`Waker`, the hub's
``pusher``).

* **Its own.** A send that made a wake-up due (``send.lua`` answers how
  soon) is handed to :meth:`Waker.due`; at that time the node claims it.
* **Everyone's.** A scan walks the shards of the due index (all of them
  every :data:`SCAN_CYCLE` seconds, a slice per tick) and claims what is due:
  the wake-ups of a node that died (their lease ran out), and those made due
  again by another node's coalescing or retry while it was gone.

A claim (``push_claim.lua``) checks, at that moment, what the contract asks
(still registered, bound nowhere or silent past ``--push-unacked``, messages
waiting) and takes a lease of :data:`LEASE` seconds, which the node renews
every :data:`RENEW_EVERY` while the gateway call lasts (``push_renew.lua``):
one node sends each wake-up; after a node's death, another sends it once
the lease has run out and a scan has found it, within about
``LEASE + SCAN_CYCLE`` (at least once, rarely twice).
"""

from twisted.internet import defer, task
from twisted.logger import Logger

from chatd.push import gateway
from chatd.redis.stats import StoreStats
from chatd.store import layout

#: a full pass over every shard of the due index takes this long (seconds)
SCAN_CYCLE = 5.0
#: ticks per pass
SCAN_TICKS = 20
#: a claim's lease (seconds), renewed every RENEW_EVERY while the call lasts
LEASE = 4.0
RENEW_EVERY = 1.5
#: most wake-ups claimed in one store call
CLAIM_BATCH = 200
#: the first retry waits this long (ms); each next one twice the last
FIRST_BACKOFF_MS = 1000
RESULTS = ("sent", "rejected", "failed", "retried", "dropped")


class PushStats:
    def __init__(self):
        self.results = dict.fromkeys(RESULTS, 0)
        self.latency = StoreStats()  # its histogram, under the name "gateway"
        self.due_seen = 0  # due wake-ups found by the last full scan


class Waker:
    log = Logger()

    def __init__(self, steps, gateway_client, settings, reactor):
        self.steps = steps
        self.gateway = gateway_client
        self.reactor = reactor
        self.content = settings.push_content
        self.interval_ms = int(settings.push_interval * 1000)
        self.unacked_ms = int(settings.push_unacked * 1000)
        self.retry_for_ms = int(settings.push_retry_for * 1000)
        self.lease_ms = int(LEASE * 1000)
        self.stats = PushStats()
        self._timers = {}      # device -> (when, DelayedCall)
        self._pending = set()  # devices to claim in the next batch
        self._flush = None
        self._scanner = None
        self._tick = 0
        self._seen = 0
        self._inflight = 0
        self._sending = {}     # device -> claims of it in flight here
        self._renewer = None

    @property
    def inflight(self):
        """Wake-ups claimed here whose gateway call is not done."""
        return self._inflight

    def start(self):
        self._scanner = task.LoopingCall(self.scan)
        self._scanner.clock = self.reactor
        self._scanner.start(SCAN_CYCLE / SCAN_TICKS, now=False)
        self._renewer = task.LoopingCall(self.renew)
        self._renewer.clock = self.reactor
        self._renewer.start(RENEW_EVERY, now=False)

    def stop(self):
        for loop in (self._scanner, self._renewer):
            if loop is not None and loop.running:
                loop.stop()
        for _, call in self._timers.values():
            if call.active():
                call.cancel()
        self._timers.clear()
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None
        self._pending.clear()
        return self.gateway.close()

    # -- the hub's side ----------------------------------------------------------

    def due(self, device, delay_ms=0):
        """D's wake-up is due in ``delay_ms`` (send.lua said so): claim it then."""
        if delay_ms <= 0:
            self._want(device)
            return
        when = self.reactor.seconds() + delay_ms / 1000.0
        old = self._timers.get(device)
        if old is not None:
            if old[0] <= when and old[1].active():
                return
            if old[1].active():
                old[1].cancel()
        call = self.reactor.callLater(delay_ms / 1000.0 + 0.01, self._fire, device)
        self._timers[device] = (when, call)

    def _fire(self, device):
        self._timers.pop(device, None)
        self._want(device)

    def _want(self, device):
        self._pending.add(device)
        if self._flush is None:
            self._flush = self.reactor.callLater(0, self._claim_pending)

    # -- claims --------------------------------------------------------------------

    def _claim_pending(self):
        self._flush = None
        devices, self._pending = list(self._pending), set()
        for i in range(0, len(devices), CLAIM_BATCH):
            self._claim(devices[i:i + CLAIM_BATCH])

    def _claim(self, devices):
        d = self.steps.claim(devices, self.lease_ms, self.unacked_ms)
        d.addCallbacks(self._claimed, self._claim_failed, errbackArgs=(devices,))

    def _claimed(self, result):
        claims, later = result
        for device, ms in later:
            self.due(device, ms)
        for claimed in claims:
            self._send(claimed)

    def renew(self):
        """Renew the leases of the wake-ups in flight here."""
        if not self._sending:
            return
        d = self.steps.renew(list(self._sending), self.lease_ms)
        d.addErrback(lambda f: self.log.warn("cannot renew wake-up leases: {why}",
                                             why=f.getErrorMessage()))

    def _claim_failed(self, failure, devices):
        # the entries stay in the due index: the scan finds them again
        self.log.warn("cannot claim wake-ups ({n}): {why}", n=len(devices),
                      why=failure.getErrorMessage())

    @defer.inlineCallbacks
    def _send(self, claimed):
        self._inflight += 1
        device = claimed.device
        self._sending[device] = self._sending.get(device, 0) + 1
        try:
            data = gateway.body(claimed, self.content)
            outcome, seconds, detail = yield self.gateway.notify(data, claimed.pushkey)
            self.stats.latency.observe("gateway", seconds)
            try:
                result, retry_ms = yield self.steps.done(
                    claimed, outcome, self.interval_ms, self.retry_for_ms, FIRST_BACKOFF_MS)
            except Exception as e:
                # the lease runs out and the wake-up is claimed again
                self.log.warn("cannot note the wake-up of {device}: {e}",
                              device=claimed.device, e=e)
                return
            self.stats.results[result] = self.stats.results.get(result, 0) + 1
            key = layout.mask_pushkey(claimed.pushkey)
            if result == "sent":
                # more messages may come while it stays away: one more
                # wake-up per interval at most (push_done.lua scored it)
                self.due(claimed.device, self.interval_ms)
            elif result == "retried":
                self.log.info("wake-up of {device} ({key}) failed: {detail}; retrying in "
                              "{delay}s", device=claimed.device, key=key, detail=detail,
                              delay=retry_ms / 1000.0)
                self.due(claimed.device, retry_ms)
            elif result == "rejected":
                self.log.info("the gateway rejected the pushkey {key} of {device}: its "
                              "push registration is removed", key=key, device=claimed.device)
            elif result == "dropped":
                self.log.warn("wake-up of {device} ({key}) dropped: the gateway failed for "
                              "longer than --push-retry-for ({detail})",
                              device=claimed.device, key=key, detail=detail)
            elif result == "failed":
                self.log.warn("wake-up of {device} ({key}) refused by the gateway: "
                              "{detail}; not retried", device=claimed.device, key=key,
                              detail=detail)
        finally:
            self._inflight -= 1
            n = self._sending.pop(device) - 1
            if n:
                self._sending[device] = n

    # -- the scan ------------------------------------------------------------------

    @defer.inlineCallbacks
    def scan(self):
        """One tick: a slice of the due index's shards."""
        shards = self.steps.shards
        per = max(1, -(-shards // SCAN_TICKS))
        first = (self._tick * per) % shards
        self._tick = (self._tick + 1) % SCAN_TICKS
        part = list(range(first, min(first + per, shards)))
        if not part:
            return
        try:
            devices = yield self.steps.scan(part)
        except Exception as e:
            self.log.warn("cannot scan the due wake-ups: {e}", e=e)
            return
        self._seen += len(devices)
        if first + per >= shards:
            self.stats.due_seen, self._seen = self._seen, 0
        for device in devices:
            self._want(device)
