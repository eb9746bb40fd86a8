"""
The store steps: every operation of chatd on its store, each one atomic Lua
function of the library (:mod:`chatd.store.library`), with the keys of
:mod:`chatd.store.layout`. The store knows no sessions: it is asked by the
hub and answers with results or :mod:`chatd.errors`.
"""

from dataclasses import dataclass
from typing import Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatd.errors import StoreUnavailable
from chatd.store import layout
from chatd.store.layout import prefix as _keys
from chatd.store.inboxes import InboxSteps
from chatd.store.nodes import NodeSteps
from chatd.store.receipts import ReceiptSteps


@dataclass(slots=True)
class SendResult:
    """What the store did with one message.

    status: ``accepted``, ``duplicate``, ``unknown_receiver`` or
    ``inbox_full``. ``entry`` is the push line of a newly accepted message
    (None for the first reply given again to a known ref: nothing new was
    stored, nothing is to be pushed).
    """

    status: str
    id: Optional[str] = None
    entry: Optional[bytes] = None
    #: ms until the receiver's wake-up is due, if this message made one due
    due: Optional[int] = None


_STATUS = {b"a": "accepted", b"d": "duplicate", b"u": "unknown_receiver",
           b"f": "inbox_full", b"ra": "accepted", b"rd": "duplicate"}

#: most messages (or acks) in one batch: about 10 ms of the store's time
MAX_BATCH = 512  # (under 1000: send.lua numbers receivers in three digits)
#: work queued or in flight at which clients stop being read, and at which
#: they are read again (see :attr:`Store.saturated`)
HIGH_WATER = 4096
LOW_WATER = 1024
#: most devices released in one store call
RELEASE_BATCH = 500
#: send.lua's flags of a message, one character: "0" + 1 (it has a ref)
#: + 2 (its sender opted in to receipts)
_FLAGS = (b"0", b"1", b"2", b"3")


def _fan_out(result, waiting):
    """Give one batched call's result (or failure) to each caller."""
    for d in waiting:
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)


class Store(ReceiptSteps, NodeSteps, InboxSteps):
    """chatd's operations on the store.

    Sends and acks are batched: every send (ack) asked for in one turn of the
    reactor goes to the store as one Lua call, which does each message's
    whole atomic step in arrival order. That is one round trip, one script
    run and one reply to parse for a whole batch instead of one per message
    (on a single Redis; on Redis Cluster a batch is split by slot, which the
    receiver hash tags make possible: see :meth:`_by_slot`).

    The store can only take so much; :attr:`saturated` tells the protocol to
    stop reading clients until the queue has drained, so that overload slows
    senders down (TCP backpressure) instead of timing their sends out.
    """

    log = Logger()

    def __init__(self, client, settings, clock, node_id="-"):
        self.client = client
        self.clock = clock
        self.node_id = node_id.encode("ascii")
        self._dedup_ms = int(settings.dedup_window * 1000)
        self._ttl_ms = int(settings.inbox_ttl * 1000)
        self._ref_ms = max(1, int(settings.ref_ttl * 1000))
        self._inbox_limit = settings.inbox_limit
        self._rmode = self._receipts_mode(settings)
        # --store-acks: reads are fenced too (see fetch.lua)
        self._fence = b"1" if settings.store_acks else b"0"
        # the send script's fixed arguments, encoded once
        self._send_args = [str(v).encode("ascii") for v in (
            self._dedup_ms, self._inbox_limit, self._ttl_ms, self._ref_ms)]
        # push wake-ups (off without --push-url: -1)
        push = getattr(settings, "push_url", None)
        self._push_args = [b"%d" % (int(settings.push_interval * 1000) if push else -1),
                           b"%d" % int(getattr(settings, "push_unacked", 15) * 1000)]
        #: shards of the due index: one per slot on a Redis Cluster
        self.due_shards = (layout.DUE_SHARDS_CLUSTER if getattr(client, "topology", None)
                           is not None else layout.DUE_SHARDS)
        self._sends = []   # (receiver, dedup, ref, flags, tail, done) not yet sent
        self._acks = {}    # inbox key -> [highest upto, [Deferreds waiting]]
        self._flush_call = None
        self._releases = []  # (device, epoch, Deferred) of this reactor turn
        self._release_call = None
        self._load = 0     # sends and acks queued or in flight
        self.saturated = False
        self._unsaturated = []

    def _now_ms(self):
        return int(self.clock.seconds() * 1000)

    # -- single calls ----------------------------------------------------------------

    def register(self, device, token_hash, claim=False, ticket=None, ticket_ms=0,
                 receipts=False):
        """Store D's new token (hash); every older token is revoked by it.
        Deferred of ``"ok"``; or, changing nothing, ``"taken"`` (``claim``:
        D is registered and not revoked) or ``"used"`` (the proof ``ticket``,
        remembered for ``ticket_ms``, was used before)."""
        prefix = _keys(device)
        used = layout.proof_key(device, ticket) if ticket else prefix + layout.PROOF + b"-"
        d = self.client.script("register", [prefix + layout.TOKEN, used,
                                             prefix + layout.ROTATION, prefix + layout.PUSH,
                                             prefix + layout.RECEIPTS], [
            token_hash, b"1" if claim else b"0", b"%d" % (ticket_ms if ticket else 0),
            b"1" if receipts else b"0"])
        return d.addCallback(lambda status: self._bound_with(status.decode("ascii")))

    def use_token(self, device, presented_hash, new_hash=None, receipts=None):
        """Use D's token (a reconnect, or a one-shot send): Deferred of
        ``"newest"`` or ``"prev"`` (valid; ``new_hash`` given: D's newest
        token is now that one), ``"bad"``, ``"reuse"`` (a token that was
        superseded after its successor was used: every token of D is
        revoked now, and the node holding D told), or ``"reused"`` (D's
        tokens were revoked by a reuse before). ``receipts`` (a reconnect):
        D's receipts opt-in, stored with a valid use. See token.lua."""
        prefix = _keys(device)
        d = self.client.script("token", [prefix + layout.TOKEN, prefix + layout.ROTATION,
                                          layout.channel(device), prefix + layout.RECEIPTS],
                               [presented_hash, new_hash or b"", layout.RETIRED_KEPT,
                                b"" if receipts is None else b"1" if receipts else b"0"])
        return d.addCallback(lambda status: self._bound_with(status.decode("ascii")))

    def token_hash(self, device):
        """D's stored token hash, or None if D never registered."""
        return self.client.call(b"GET", _keys(device) + layout.TOKEN)

    def fetch(self, device, after, count, max_bytes=0):
        """D's waiting messages with ids after ``after`` (an int), at most
        ``count`` and (but for the first) ``max_bytes``: Deferred of
        ``(pending, last_id, entries)`` where pending counts all stored
        messages and last_id is D's id counter."""
        prefix = _keys(device)
        d = self.client.script("fetch", [prefix + layout.INBOX, prefix + layout.SEQ],
                               [after, count, self._now_ms(), self._ttl_ms, max_bytes,
                                self._fence])
        return d.addCallback(lambda r: (int(r[0]), int(r[1]), r[2:]))

    # -- presence (see chatd.hub.presence) ------------------------------------------------

    def claim(self, device, expiry_ms, token_hash=None, opened_ms=None):
        """Bind D to this node: Deferred of its new epoch (an int); -1 when
        ``token_hash`` (the new token the bind was given) is no longer D's
        newest, -2 when D is held by a connection opened after ``opened_ms``
        (the binding connection's; see claim.lua)."""
        prefix = _keys(device)
        d = self.client.script("claim", [prefix + layout.NODE, prefix + layout.EPOCH,
                                          layout.channel(device), prefix + layout.TOKEN,
                                          prefix + layout.PUSH, prefix + layout.SINCE],
                               [self.node_id, expiry_ms, token_hash or b"", self._now_ms(),
                                b"" if opened_ms is None else b"%d" % opened_ms])
        return d.addCallback(int)

    def renew(self, held, expiry_ms):
        """Renew the records of ``held`` ([(device, epoch)]): Deferred of
        ``(lost, restored)``: those this node has lost, and those whose record
        had run out and was written again (see renew.lua)."""
        groups = self._by_slot(held, lambda h: _keys(h[0]))
        if len(groups) == 1:
            return self._renew(held, expiry_ms)
        d = defer.gatherResults([self._renew(g, expiry_ms) for g in groups],
                                consumeErrors=True)
        d.addErrback(lambda f: f.value.subFailure)
        return d.addCallback(lambda parts: ([x for p in parts for x in p[0]],
                                            [x for p in parts for x in p[1]]))

    def _renew(self, held, expiry_ms):
        keys, args = [], [expiry_ms]
        for device, epoch in held:
            prefix = _keys(device)
            keys += [prefix + layout.NODE, prefix + layout.EPOCH]
            args.append(self.presence_value(epoch))
        d = self.client.script("renew", keys, args)
        return d.addCallback(lambda r: ([held[int(i) - 1] for i in r if int(i) > 0],
                                        [held[-int(i) - 1] for i in r if int(i) < 0]))

    def release(self, device, epoch):
        """Drop D's presence record if it is still this node's: Deferred
        that fires once stored. The releases of one reactor turn go to the
        store together (a batch per slot, RELEASE_BATCH at most per call):
        when every phone of a node closes at once, one call per device
        crowded out the binds that followed (store calls past their deadline)."""
        d = defer.Deferred()
        self._releases.append((device, epoch, d))
        if self._release_call is None:
            self._release_call = self.clock.callLater(0, self._release_batch)
        return d

    def _release_batch(self):
        self._release_call = None
        items, self._releases = self._releases, []
        for group in self._by_slot(items, lambda r: _keys(r[0])):
            for i in range(0, len(group), RELEASE_BATCH):
                part = group[i:i + RELEASE_BATCH]
                d = self.client.script("release", [_keys(r[0]) + layout.NODE for r in part],
                                       [self.presence_value(r[1]) for r in part])
                d.addBoth(_fan_out, [r[2] for r in part])

    def presence_value(self, epoch):
        return b"%s %d" % (self.node_id, epoch)

    def presence(self, device):
        """D's presence record as stored (bytes), or None."""
        return self.client.call(b"GET", _keys(device) + layout.NODE)

    # -- batched calls ---------------------------------------------------------------

    def send_then(self, done, sender, receiver, text, ref=None, raw=None, receipts=True):
        """Accept (or refuse) one message: ``done(result, None)`` with a
        :class:`SendResult`, or ``done(None, failure)``, is called once.
        ``raw`` is the text as UTF-8, if the caller has it already. A plain
        callable, not a Deferred: one per message was a tenth of chatd's
        time under load. ``receipts``: the sender's connection opted in to
        receipts (or it is not known: a one-shot send), so that the ack may
        make it a receipt (``rs`` in chatd/store/layout.py)."""
        # receiver, its dedup marker and ref record (keys), its flags for
        # send.lua (ref, receipts), the stored message's tail (see
        # _send_group for send.lua's KEYS)
        flags = (ref is not None) + 2 * (receipts and self._rmode != b"0")
        self._sends.append((receiver, layout.dedup_key(receiver, raw or text.encode("utf-8")),
                            None if ref is None else layout.ref_key(receiver, sender, ref),
                            _FLAGS[flags], layout.push_tail(sender, receiver, text), done))
        self._queued(len(self._sends))

    def ack_then(self, done, device, upto):
        """Remove D's messages with ids up to ``upto`` (an int); acks of one
        device in one batch are folded into the highest. ``done(None)`` or
        ``done(failure)`` is called once (a plain callable, as for sends)."""
        key = _keys(device) + layout.INBOX
        pending = self._acks.get(key)
        if pending is None:
            pending = self._acks[key] = [upto, [done]]
            self._queued(len(self._acks))
        else:
            if upto > pending[0]:
                pending[0] = upto
            pending[1].append(done)

    def _queued(self, batch_size):
        self._load += 1
        if self._load >= HIGH_WATER:
            self.saturated = True
        if batch_size >= MAX_BATCH:
            self._flush()
        elif self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self):
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        sends, self._sends = self._sends, []
        if sends:
            self._send_batch(sends)
        acks, self._acks = self._acks, {}
        if acks:
            self._ack_batch(acks)

    def _by_slot(self, items, key):
        """``items`` in one group (one store), or split by Redis Cluster slot
        (each group in the order of ``items``): a Lua call may only touch
        keys of one slot there. Pipelined on each primary's connection, a
        batch per slot costs one call per slot instead of one per batch (see
        README "Stores")."""
        return self.client.split(items, key)

    def _send_batch(self, sends):
        for group in self._by_slot(sends, lambda s: s[1]):
            self._send_group(group)

    def _send_group(self, sends):
        """One call of send.lua: five keys per receiver (each once; seven
        with push wake-ups), one per message (its dedup marker), one per
        message with a ref; each message's flags, receiver number and tail."""
        now = b"%d" % self._now_ms()
        keys, marks, refs, numbers, tails = [], [], [], [], []
        ref_keys = []
        number = {}
        push = self._push_args[0] != b"-1"
        for receiver, dedup, ref, flags, tail, _ in sends:
            r = number.get(receiver)
            if r is None:
                r = number[receiver] = len(number) + 1
                prefix = _keys(receiver)
                keys += [prefix + layout.TOKEN, prefix + layout.SEQ, prefix + layout.INBOX,
                         prefix + layout.NODE, prefix + layout.RECEIPT_SENDERS]
                if push:
                    keys += [prefix + layout.PUSH,
                             layout.device_due_key(receiver, self.due_shards)]
            marks.append(dedup)
            refs.append(flags)
            if ref is not None:
                ref_keys.append(ref)
            numbers.append(b"%03d" % r)
            tails.append(tail)
        keys += marks
        keys += ref_keys
        d = self.client.script("send", keys, [
            now, *self._send_args, self.client.late_ms(keys[0]), b"".join(refs),
            self.node_id, *self._push_args, b"%d" % len(number), b"".join(numbers), *tails])
        d.addCallbacks(self._sent, self._failed, (sends, now), None, (sends,))

    def _sent(self, reply, sends, now):
        self._done(len(sends))
        if reply == [b"late"]:
            return self._failed(None, sends)
        head, mid = layout.ENTRY_HEAD, layout.ENTRY_MID + now
        for i, (_, _, _, _, tail, done) in enumerate(sends):
            code, value = reply[2 * i], reply[2 * i + 1]
            if code == b"a":  # the stored message: as send.lua stored it
                result = SendResult("accepted", value.decode("ascii"),
                                    b"".join((head, value, mid, tail)))
            elif code == b"ra":
                result = SendResult("accepted", value.decode("ascii"))
            elif code[:1] == b"a":  # and a wake-up made due (ms until due)
                result = SendResult("accepted", value.decode("ascii"),
                                    b"".join((head, value, mid, tail)), int(float(code[1:])))
            else:
                result = SendResult(_STATUS[code])
            try:
                done(result, None)
            except Exception:
                self.log.failure("answering a send")

    def _failed(self, failure, sends):
        if failure is not None:
            self._done(len(sends))
            error = failure.value
        else:
            self.client.stats.unavailable += 1
            error = StoreUnavailable("the store ran the batch after its deadline; "
                                     "nothing was stored")
        for *_, done in sends:
            try:
                done(None, Failure(error))
            except Exception:
                self.log.failure("answering a failed send")

    def _ack_batch(self, acks):
        if self._rmode == b"o":
            # the receipts stamp (RECEIPTS_TURNED, another slot): read after
            # these acks came, so that an opt-in made before them counts
            self._turned().addCallback(self._ack_groups, acks)
        else:
            self._ack_groups(b"", acks)

    def _ack_groups(self, turned, acks):
        for keys in self._by_slot(list(acks), lambda k: k):
            self._ack_group(acks, keys, turned)

    def _ack_group(self, acks, keys, turned=b""):
        # the receipts mode and what it needs; the inbox TTL also for a
        # repeated ack (see ack.lua)
        args = [acks[k][0] for k in keys] + [self._rmode, self._now_ms(), self.node_id,
                                             self._ttl_ms, turned]
        declared = keys
        if self._rmode != b"0":
            declared = keys + [k[:-len(layout.INBOX)] + layout.RECEIPT_SENDERS for k in keys]
        if self._rmode == b"o":
            # each receiver's outbox, declared: a key of a slot being
            # migrated is refused before the step runs (TRYAGAIN/ASK, and
            # the cluster client retries), never halfway through it
            declared += [k[:-len(layout.INBOX)] + layout.OUTBOX for k in keys]
        d = self.client.script("ack", declared, args)

        def done(result):
            self._done(len(keys))
            failure = result if isinstance(result, Failure) else None
            if failure is None and isinstance(result, list):
                self._receipt_work(result, 1)
            for k in keys:
                for waiter in acks[k][1]:
                    try:
                        waiter(failure)
                    except Exception:
                        self.log.failure("answering an ack")

        d.addBoth(done)

    def _done(self, n):
        self._load -= n
        if self.saturated and self._load <= LOW_WATER:
            self.saturated = False
            waiting, self._unsaturated = self._unsaturated, []
            for d in waiting:
                d.callback(None)

    @property
    def load(self):
        """Sends and acks queued for the store or in flight."""
        return self._load

    def when_unsaturated(self):
        """Deferred that fires once the store has room again."""
        if not self.saturated:
            return defer.succeed(None)
        d = defer.Deferred()
        self._unsaturated.append(d)
        return d
