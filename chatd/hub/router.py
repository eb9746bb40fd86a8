"""
Who is connected, as whom (:class:`Hub`, with the :class:`Connection` it
is handed); where an accepted message goes. What each bound connection has
been pushed is its :class:`chatd.hub.delivery.Delivery`.

The hub knows no sockets and no Redis commands. It is handed connections (any
object with the methods of :class:`Connection`) and a
:class:`chatd.store.steps.Store`. A receiver that is not bound here may be bound on
another node: the hub hands such messages to its ``remote`` (on a single node
there is none, and the message simply waits in the receiver's inbox); the
``remote`` also claims each device for this node before it is bound, and
tells the hub when another node has taken a device over
(:mod:`chatd.hub.presence`).
"""

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatd.store import layout
from chatd.store.pushsteps import PushSteps
from chatd.hub import tokens
from chatd.hub.binding import Binding
from chatd.hub.turns import Turns
from chatd.wire.packets import PacketError


class Connection:
    """What the hub needs of a client connection (the wire's session
    implements it)."""

    #: the connection's Delivery while it is bound: set and cleared by the
    #: hub alone, the one record of the binding on the connection's side
    delivery = None

    @property
    def device(self):
        """The bound destinationId, or None (from ``delivery``)."""
        return self.delivery.device if self.delivery is not None else None

    def registered(self, device, token):
        """Send the ``registered`` reply."""

    def reconnected(self, device, pending, token):
        """Send the ``reconnected`` reply (with the device's next token)."""

    #: when the connection was opened (seconds, the node's clock): of two
    #: connections of one device, the one opened later keeps it
    opened_at = 0.0

    def peer(self):
        """Where the client is (host:port), for the logs."""

    def push(self, entries):
        """Write stored messages (push lines without newline), in order."""

    def kick(self, code, reason):
        """Send an error and close (``session_replaced``, ``revoked``)."""

    def report(self, code, reason):
        """Send an error and stay open (a failed ack)."""

    def wait_writable(self):
        """Deferred that fires when the client is reading again."""

    closed = False  # True once the connection is closing or gone


class NoRemote:
    """The seam for receivers bound on other nodes. Without one (a hub in a
    unit test), an accepted message for a receiver not bound here waits in
    its inbox and is pushed when the receiver next registers or reconnects;
    nothing is claimed in the store."""

    def claim(self, device, token_hash=None, opened_ms=None):
        return defer.succeed(0)

    def release(self, device, epoch):
        pass

    def deliver(self, receiver, server_id, entry):
        pass


class NoPusher:
    """Without push wake-ups (no --push-url): a due wake-up is not sent by
    this node (send.lua makes none due then)."""

    def due(self, device, delay_ms=0):
        pass


class Hub(Binding):
    """The session registry and router of one node (binding a connection to
    a device is its base class, :class:`chatd.hub.binding.Binding`)."""

    log = Logger()

    def __init__(self, store, settings, clock, remote=None, pusher=None):
        self.store = store
        self.settings = settings
        self.clock = clock
        self.remote = remote or NoRemote()
        #: where due wake-ups go (chatd.push.waker.Waker): ``due(device, delay_ms)``
        self.pusher = pusher or NoPusher()
        self.push_steps = PushSteps(store)
        self.batch = settings.drain_batch
        # a drain batch is one write; half the output limit leaves room for
        # the replies written while the client reads it (see
        # chatd.wire.output.Output: the write that fills its buffer counts)
        self.batch_bytes = max(1, settings.output_limit // 2)
        #: store work in turns (chatd.hub.turns): binds, and inbox reads
        self.binds = Turns(settings.bind_turns)
        self.reads = Turns(settings.drain_reads)
        self.sessions = {}  # destinationId -> Delivery (its .conn has it as .delivery)
        self.token_reuse = 0  # reuses detected here (chatd_token_reuse_total)
        # receipts made by this node's acks and reads for devices bound here
        store.receipt_here = self._receipt_here

    # -- binding -----------------------------------------------------------------

    @property
    def node_id(self):
        return self.store.node_id.decode("ascii")

    def send(self, conn, packet, done):
        """Accept one message packet. Every outcome goes to ``done(result,
        failure)``, called once: ``done(result, None)`` with a
        :class:`chatd.store.steps.SendResult`, or ``done(None, failure)`` (a
        PacketError about the packet itself, possibly at once, or the
        store's failure). A newly accepted message is routed to its receiver
        right after ``done`` has answered the sender.

        The hot path of chatd (a bound sender: no store call but the send
        itself), so it passes plain callables rather than Deferreds."""
        delivery = conn.delivery
        try:
            if delivery is not None:
                sender = delivery.device
                if packet.sender is not None and packet.sender != sender:
                    raise PacketError("forbidden", "this connection sends as %s, not %s"
                                      % (sender, packet.sender), field="sender")
                if packet.token is not None and not tokens.token_matches(
                        packet.token, *delivery.token_hashes):
                    raise PacketError("bad_token", "the token is wrong or revoked",
                                      field="token")
            elif packet.sender is None or packet.token is None:
                raise PacketError("not_registered", "register or reconnect first, or "
                                  "give sender and token with the message")
        except PacketError:
            done(None, Failure())
            return
        if delivery is not None:
            self._store_send(sender, packet, done, delivery.receipts)
        else:
            # a one-shot send uses its token (it may be the newest's first use)
            self.store.use_token(packet.sender, tokens.token_hash(packet.token)).addCallbacks(
                self._one_shot, lambda f: done(None, f), (conn, packet, done))

    def _one_shot(self, status, conn, packet, done):
        try:
            self._check_use(conn, packet.sender, status)
        except PacketError:
            done(None, Failure())
            return
        self._store_send(packet.sender, packet, done)

    def _store_send(self, sender, packet, done, receipts=True):
        """``receipts``: the sender opted in (a one-shot send: not known,
        so its messages may get receipts: the ack checks)."""
        receiver = packet.receiver

        def sent(result, failure):
            # two steps: the sender's answer, then the receiver's push
            try:
                done(result, failure)
            finally:
                if result is not None and result.entry is not None:
                    self._accepted(receiver, result)

        self.store.send_then(sent, sender, receiver, packet.text, packet.ref, packet.raw,
                             receipts)

    def _accepted(self, receiver, result):
        try:
            self.route(receiver, int(result.id), result.entry)
            if result.due is not None:
                self.pusher.due(receiver, result.due)
        except Exception:
            self.log.failure("pushing a message to {receiver}", receiver=receiver)

    def set_push(self, conn, pushkey, app):
        """Store (pushkey "": remove) the push registration of the device
        bound on ``conn``: Deferred that fires once it is stored."""
        delivery = conn.delivery
        if delivery is None:
            raise PacketError("not_registered", "push needs a registered connection")
        return self.push_steps.set(delivery.device, pushkey, app if pushkey else "",
                                   self.clock.seconds())

    def route(self, receiver, server_id, entry):
        """Push a just-accepted message to its receiver, wherever it is bound."""
        delivery = self.sessions.get(receiver)
        if delivery is not None:
            delivery.offer(server_id, entry)
        else:
            self.remote.deliver(receiver, server_id, entry)

    # -- from other nodes (the remote) ----------------------------------------------

    def held(self):
        """[(device, epoch)] of every device bound here."""
        return [(device, d.epoch) for device, d in self.sessions.items()]

    def notified(self, device, entry):
        """Another node accepted a message for D (its push line)."""
        delivery = self.sessions.get(device)
        if delivery is not None:
            if self.settings.store_acks:
                # the line was published before the replicas confirmed it:
                # read it from the inbox, behind a WAIT (see fetch.lua)
                delivery.poke()
            else:
                delivery.offer(layout.entry_id(entry), entry)

    def replaced(self, device, epoch, newer=False, where=None):
        """D was bound elsewhere with ``epoch`` (``newer``: close ours if it is
        older), or this node lost its claim of ``epoch`` (close it)."""
        delivery = self.sessions.get(device)
        if delivery is None or (delivery.epoch >= epoch if newer else delivery.epoch != epoch):
            return
        self.log.info("{device} was bound on node {where}; closing it here",
                      device=device, where=where or "?")
        self._drop(delivery, "session_replaced",
                   "%s connected again elsewhere; this connection is closed" % device)

    def revoke(self, device):
        """D's tokens were revoked (by the operator, or because an old token
        of D was used again): close its connection here."""
        delivery = self.sessions.get(device)
        if delivery is not None:
            self._drop(delivery, "revoked", "every token of %s was revoked (an old "
                       "token of it was used elsewhere, or the operator revoked them); "
                       "register again" % device)

    def catch_up(self, devices=None):
        """Read every bound inbox, or those of ``devices`` (notifications
        may have been lost)."""
        if devices is None:
            deliveries = list(self.sessions.values())
        else:
            deliveries = [self.sessions[d] for d in devices if d in self.sessions]
        for delivery in deliveries:
            delivery.poke()

    def _receipt_here(self, sender, entry):
        """A receipt was made for a sender the store saw bound on this node."""
        delivery = self.sessions.get(sender)
        if delivery is not None:
            delivery.offer(layout.entry_id(entry), entry)

    def read(self, conn, server_id, sender):
        """A ``read`` (1.2): Deferred of None, or failing with PacketError
        bad_ack (an id higher than any given to this device). With
        ``--receipts off`` it is accepted and ignored."""
        delivery = conn.delivery
        if delivery is None:
            raise PacketError("not_registered", "read needs a registered connection")
        if not self.settings.receipts:
            return defer.succeed(None)
        return delivery.read(server_id, sender)

    def ack(self, conn, server_id):
        delivery = conn.delivery
        if delivery is None:
            raise PacketError("not_registered", "ack needs a registered connection")
        delivery.ack(server_id)
