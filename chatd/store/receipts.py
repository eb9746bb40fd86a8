"""
Receipts (contract 1.2), the store's side: the opt-in, the ``read`` step,
and what the ``ack`` step hands back. A mixin of :class:`chatd.store.steps.Store`.

One store: ``ack.lua`` and ``read.lua`` write each receipt into its
sender's inbox in the very step of the ack (read), so a node that dies after
it loses nothing (``make_receipt`` in ``_prelude.lua``).

Redis Cluster: the sender's inbox is in another slot than the receiver's,
and one atomic step cannot span two slots. The ack (read) step writes the
receipt into the receiver's own ``outbox`` (its slot, same step as the ack),
then this node moves the outbox entries into their senders' inboxes, one
step per primary holding the senders' slots (``receipt.lua``, idempotent: a
receipt not newer than the sender's last one for (receiver, status) makes
nothing), and deletes those it moved, each only if unchanged, in one step
per receiver (``unbox.lua``). A node that dies between the steps leaves the entry in the
outbox: the receiver's next ack, on any node, returns the whole outbox and
moves it; so does its next bind (:meth:`ReceiptSteps.sweep_outboxes`); and,
should it never ack nor bind again, every node's outbox sweeper
(:class:`chatd.hub.sweeper.OutboxSweeper`, one bounded SCAN per primary per
pass: :meth:`ReceiptSteps.sweep_pass`). So no receipt is lost; one may be
made late, never twice.

Which senders an ack looks at: the sending node knows its sender's opt-in,
so ``send.lua`` names an opted-in sender in the receiver's ``rs`` (its
newest id there, same step as the message), and an ack looks only at the
senders named there, checking their opt-in at the ack (the contract's
moment); one that names none is as cheap as with ``--receipts off`` (no
read of the removed range, no opt-in read, no outbox entry). A device that
opts in while it had not (:meth:`ReceiptSteps._bound_with`) and a node's
start raise ``chatd:rcpt:turned`` (:meth:`ReceiptSteps.receipts_turned`):
messages stored up to then are acked the careful way, every sender checked
as before ``rs`` (chatd/store/layout.py).
"""

from twisted.internet import defer
from twisted.logger import Logger

from chatd.redis.cluster import slot_of
from chatd.store import layout
from chatd.store.layout import prefix as _keys
from chatd.store.scans import scan_step

DELIVERED, READ = "delivered", "read"


class ReceiptSteps:
    """Receipt steps of the store (uses ``client``, ``node_id``, ``_ttl_ms``,
    ``_now_ms``)."""

    log = Logger()
    #: called with (sender, receipt entry) for a receipt made for a sender
    #: bound on this node (the hub pushes it; others are published)
    receipt_here = None

    def _receipts_mode(self, settings):
        if not getattr(settings, "receipts", True):
            return b"0"
        return b"o" if getattr(self.client, "sharded", False) else b"d"

    @property
    def uses_outboxes(self):
        """Receipts go through outboxes (Redis Cluster, receipts on)."""
        return self._rmode == b"o"

    # -- the opt-in's turns (chatd/store/layout.py "rs", "rcpt:turned") --------------

    def receipts_turned(self, margin_ms=layout.TURN_MARGIN_MS):
        """Raise RECEIPTS_TURNED to now + ``margin_ms``: messages stored up
        to then are acked carefully (every sender's opt-in checked). Called
        when a device opts in at a bind while it had not, before its reply,
        and when the node starts. Deferred that fires once stored."""
        if self._rmode == b"0":
            return defer.succeed(None)
        return self.client.script("turned", [layout.RECEIPTS_TURNED],
                                  [self._now_ms() + margin_ms])

    def _turned(self):
        """Deferred of RECEIPTS_TURNED as stored (b"" if absent); if it
        cannot be read, a time far ahead (every ack careful: nothing lost)."""
        d = self.client.call(b"GET", layout.RECEIPTS_TURNED)

        def failed(f):
            self.log.warn("reading {key}: {why}; acks check every sender",
                          key=layout.RECEIPTS_TURNED, why=f.value)
            return b"%d" % (1 << 62)

        return d.addCallbacks(lambda v: v or b"", failed)

    def _bound_with(self, status):
        """A register's or reconnect's status from the store: ``"<status>+"``
        when the device opted in while it had not, then RECEIPTS_TURNED is
        raised first. Deferred of the status."""
        if not status.endswith("+"):
            return status
        return self.receipts_turned().addCallback(lambda _: status[:-1])

    def read(self, device, sender, upto):
        """D has shown every message from ``sender`` up to ``upto`` (an
        int): Deferred of False if ``upto`` is higher than any id D was ever
        given, else True (a read receipt made, if ``sender`` opted in)."""
        if self._rmode == b"0":
            return defer.succeed(True)
        prefix = _keys(device)
        d = self.client.script("read", [prefix + layout.SEQ, prefix + layout.OUTBOX], [
            device, sender, upto, self._now_ms(), self.node_id, self._ttl_ms,
            self._rmode])

        def done(reply):
            if reply[0] == b"bad":
                return False
            self._receipt_work(reply, 0)
            return True

        return d.addCallback(done)

    def _receipt_work(self, reply, start):
        """What an ack or read step handed back, from ``reply[start]`` on:
        receipts to push here, outbox entries to move."""
        moves = []
        for i in range(start, len(reply) - 2, 3):
            tag, who, what = reply[i], reply[i + 1], reply[i + 2]
            try:
                if tag == b"h":
                    self._here(who.decode("ascii"), what)
                elif tag == b"o":
                    moves.append((who.decode("ascii"), what))
            except Exception:
                self.log.failure("handling a receipt")
        if moves:
            self._moves(moves)

    def _here(self, sender, entry):
        if self.receipt_here is not None:
            self.receipt_here(sender, entry)

    def _moves(self, moves):
        """Move outbox entries (``(receiver, b"<field>=<value>")``) into
        their senders' inboxes, one step per primary holding their senders'
        slots (``receipt.lua``), then delete those moved, one step per
        receiver (``unbox.lua``; cluster: see the module's doc). Deferred of
        how many moved; a group that fails stays in the outboxes."""
        groups = {}
        for move in moves:
            groups.setdefault(self._primary_of(_sender(move[1])), []).append(move)
        groups = list(groups.values())
        d = defer.gatherResults([self._move_group(g) for g in groups])

        def unbox(results):
            done = {}
            for group, ok in zip(groups, results):
                for receiver, item in group if ok else ():
                    done.setdefault(receiver, []).extend(item.split(b"=", 1))
            calls = [self.client.script("unbox", [_keys(r) + layout.OUTBOX], args)
                     for r, args in done.items()]
            moved = sum(len(args) // 2 for args in done.values())
            return defer.gatherResults(calls, consumeErrors=True).addCallback(
                lambda _: moved)

        def failed(f):
            # left in the outbox: moved again (and made once) later
            self.log.warn("moved receipts stay in their outboxes until a later move: "
                          "{why}", why=getattr(f.value, "subFailure", f).value)
            return 0

        return d.addCallback(unbox).addErrback(failed)

    def _primary_of(self, sender):
        owner = getattr(self.client, "owner", None)
        return owner(slot_of(_keys(sender))) if owner is not None else None

    def _move_group(self, group):
        """Make the outbox entries of ``group`` (senders on one primary) in
        their senders' inboxes, in one step: Deferred of True, or of False
        if it failed (they stay in their outboxes)."""
        receiver, item = group[0]
        sender, status = _sender(item), _status(item)
        p = _keys(sender)
        # the first sender's keys, declared (see receipt.lua): routed by them,
        # and refused whole on a slot being migrated, never stopped halfway
        keys = [p + layout.RECEIPTS, p + layout.INBOX, p + layout.SEQ, p + layout.NODE,
                p + layout.EPOCH, p + layout.RECEIPT_AT + status + b":" + receiver.encode()]
        args = [self.node_id, self._ttl_ms]
        for receiver, item in group:
            field, _, value = item.partition(b"=")
            who, _, status = field.partition(b" ")
            upto, _, at = value.partition(b" ")
            args += [who, receiver, status, upto, at]
        d = self.client.script("receipt", keys, args)

        def moved(reply):
            for i in range(0, len(reply or ()) - 1, 2):
                self._here(reply[i].decode("ascii"), reply[i + 1])
            return True

        def failed(f):
            # left in the outboxes: moved at each receiver's next ack or
            # bind, or by a sweep
            self.log.warn("{n} receipt(s) wait in outboxes (for {s}...): {why}",
                          n=len(group), s=sender, why=f.value)
            return False

        return d.addCallbacks(moved, failed)

    def sweep_outboxes(self, devices, older_ms=None):
        """Move whatever waits in the outboxes of ``devices`` (receivers):
        left there by a node that died between the two steps (or, with
        ``older_ms``, only entries written longer ago than that: a younger
        one is being moved by the node that wrote it). Deferred of how many
        entries it moved (a move that fails is logged, and the entry stays).
        The outboxes are read all at once (a sweeper pass finds up to a
        thousand: one round trip each, in turn, was the pass's whole
        time), and what is due is moved in one :meth:`_moves`."""
        cutoff = None if older_ms is None else self._now_ms() - older_ms
        reads = defer.gatherResults(
            [self.client.call(b"HGETALL", _keys(r) + layout.OUTBOX) for r in devices],
            consumeErrors=True)
        # the first read that failed, as itself (not wrapped in FirstError)
        reads.addErrback(lambda f: f.trap(defer.FirstError) and f.value.subFailure)

        def move(replies):
            due = [(receiver, items[j] + b"=" + items[j + 1])
                   for receiver, items in zip(devices, replies)
                   for j in range(0, len(items or ()), 2)
                   if cutoff is None or int(items[j + 1].partition(b" ")[2] or 0) <= cutoff]
            return self._moves(due) if due else 0

        return reads.addCallback(move)

    def sweep_pass(self, cursors, count, older_ms):
        """One bounded pass of the outbox sweeper (Redis Cluster,
        :func:`chatd.store.scans.scan_step`): the entries of the outboxes
        found that are older than ``older_ms`` moved. Deferred of (outboxes
        found, entries moved)."""
        def move(keys):
            return self.sweep_outboxes([d for d in (layout.device_of(k, layout.OUTBOX)
                                                    for k in keys) if d is not None], older_ms)

        return scan_step(self.client, cursors, layout.OUTBOX, b"hash", count, move,
                         "sweeping the outboxes")


def _sender(item):
    """The sender of an outbox entry ``b"<sender> <status>=<upto> <at>"``."""
    return item.partition(b" ")[0].decode("ascii")


def _status(item):
    return item.partition(b"=")[0].partition(b" ")[2]
