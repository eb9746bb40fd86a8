"""
The push state of one bound connection (:class:`Delivery`): what was pushed
on it, the inbox read after the last id pushed, and the acks it sends to the
store. Made and dropped by :class:`chatd.hub.router.Hub`.
"""

from twisted.internet import defer
from twisted.logger import Logger

from chatd.store import layout
from chatd.wire import packets
from chatd.wire.packets import PacketError
from chatd.errors import StoreUnavailable


class Delivery:
    """The push state of one bound connection.

    Ids pushed on one connection only ever increase (``last_id``), so nothing
    is pushed twice on it. A live message is written at once only if it is the
    very next id; anything else (a gap, or a message that arrives while the
    inbox is being read) is left to :meth:`_drain`, which reads the inbox after
    ``last_id`` until it has caught up. So waiting messages go out oldest
    first, before any newer one, however the replies interleave.
    """

    log = Logger()

    def __init__(self, hub, device, conn, token_hashes, epoch=0, receipts=False):
        self.hub = hub
        self.device = device
        self.epoch = epoch  # of this bind (see chatd.hub.presence)
        self.conn = conn
        # the hashes of the tokens a packet on this connection may carry: the
        # newest, and the one presented to get it (see chatd.hub.router.reconnect)
        self.token_hashes = token_hashes
        # the bind opted in to receipts: its messages may get receipts
        # (chatd.store.steps.Store.send_then)
        self.receipts = receipts
        self.last_id = 0          # every id up to here is pushed here or gone
        self.first_pushed = None  # the ids pushed on this connection:
        self.last_pushed = None   # first_pushed..last_pushed
        self.acked = 0            # highest id acked on this connection
        self.closed = False
        self._draining = False
        self._more = False
        self._retry = None
        self._retry_delay = 0.5
        self._ack_sent = 0        # highest ack handed to the store
        self._ack_busy = False

    # -- pushing ---------------------------------------------------------------

    def start(self, announce):
        """Read the inbox for the first time: ``announce(pending)`` sends the
        register/reconnect reply, then the first batch is pushed and the
        rest follows. The Deferred fires after the first batch; it fails with
        StoreUnavailable if the inbox cannot be read (nothing was sent)."""
        self._draining = True
        d = self._read()

        def first(result):
            if self.closed or result is None:
                return
            pending, last, entries = result
            announce(pending)
            if self._take(entries, last) and not self._more:
                self._draining = False
            else:
                self._drain()

        def failed(f):
            self._draining = False
            return f

        return d.addCallbacks(first, failed)

    def _read(self):
        """The next batch of the inbox, in this node's turn of inbox reads
        (chatd.hub.turns): Deferred of (pending, last, entries), or of None
        if this delivery closed while waiting its turn."""
        return self.hub.reads.run(self, self.hub.store.fetch, self.device, self.last_id,
                                   self.hub.batch, self.hub.batch_bytes)

    def offer(self, server_id, entry):
        """A message for this device was just accepted (id as int)."""
        if self.closed or server_id <= self.last_id:
            return
        if self._draining or self._retry is not None or server_id != self.last_id + 1:
            self._more = True
            if not self._draining and self._retry is None:
                self._drain()
            return
        self.last_id = server_id
        self._pushed(server_id, server_id)
        self.conn.push((entry,))

    def poke(self):
        """Messages may have come without a word (a lost notification): read
        the inbox after ``last_id``."""
        if self.closed:
            return
        self._more = True
        if not self._draining and self._retry is None:
            self._drain()

    def _take(self, entries, last):
        """Push what a fetch returned; True when the inbox is caught up."""
        fresh = [e for e in entries if layout.entry_id(e) > self.last_id]
        if fresh:
            first, high = layout.entry_id(fresh[0]), layout.entry_id(fresh[-1])
            self.last_id = high
            self._pushed(first, high)
            self.conn.push(fresh)
        if entries and layout.entry_id(entries[-1]) < last:
            return False  # a batch cut by its count or size: more to read
        # the fetch saw the whole inbox: every id up to `last` is pushed or gone
        self.last_id = max(self.last_id, last)
        return True

    def _pushed(self, first, high):
        if self.first_pushed is None:
            self.first_pushed = first
        self.last_pushed = high

    @defer.inlineCallbacks
    def _drain(self):
        self._draining = True
        try:
            while not self.closed:
                self._more = False
                yield self.conn.wait_writable()
                if self.closed:
                    return
                try:
                    result = yield self._read()
                except StoreUnavailable as e:
                    self._retry_later(e)
                    return
                if self.closed or result is None:
                    return
                _, last, entries = result
                self._retry_delay = 0.5
                if self._take(entries, last) and not self._more:
                    return
        finally:
            self._draining = False

    def _retry_later(self, why):
        """The inbox could not be read: try again, backing off, while bound."""
        self.log.warn("cannot read the inbox of {device}: {why}; retrying in {delay}s",
                      device=self.device, why=why, delay=self._retry_delay)

        def again():
            self._retry = None
            self._drain()

        self._retry = self.hub.clock.callLater(self._retry_delay, again)
        self._retry_delay = min(self._retry_delay * 2, 5.0)

    # -- acks ------------------------------------------------------------------

    def ack(self, server_id):
        """A cumulative ack from the device; PacketError bad_ack if that id was
        not pushed on this connection."""
        if self.first_pushed is None or not self.first_pushed <= server_id <= self.last_pushed:
            raise PacketError("bad_ack", "id %s was not pushed on this connection"
                              % packets.format_id(max(server_id, 0)), field="ack")
        if server_id > self.acked:
            self.acked = server_id
        self._send_ack()

    def _send_ack(self):
        """One ack at a time per connection; acks that arrive meanwhile are
        folded into the next one (they are cumulative)."""
        if self._ack_busy or self.acked <= self._ack_sent:
            return
        self._ack_busy = True
        upto = self.acked

        def done(failure):
            self._ack_busy = False
            if failure is None:
                self._ack_sent = max(self._ack_sent, upto)
                # an ack folded in meanwhile is stored even if the connection
                # has closed since: the device did show those messages (a
                # listener that exits right after its last ack lost it)
                self._send_ack()
                return
            if not failure.check(StoreUnavailable):
                self.log.failure("storing an ack of {device}", failure, device=self.device)
            elif not self.closed:
                self.conn.report("unavailable", "the ack of %s could not be stored "
                                 "(%s); ack again later" % (packets.format_id(upto),
                                                            failure.value))

        self.hub.store.ack_then(done, self.device, upto)

    def read(self, server_id, sender):
        """This device has shown every message from ``sender`` up to
        ``server_id`` (a ``read``, 1.2): the store makes ``sender``'s read
        receipt. Deferred; fails with PacketError bad_ack for an id higher
        than any given to a message for this device."""
        def checked(ok):
            if not ok:
                raise PacketError("bad_ack", "id %s was never given to a message for %s"
                                  % (packets.format_id(server_id), self.device),
                                  field="read")

        return self.hub.store.read(self.device, sender, server_id).addCallback(checked)

    def close(self):
        self.closed = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
