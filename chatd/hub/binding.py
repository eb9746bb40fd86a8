"""
Binding a connection to a device (a base class of :class:`chatd.hub.router.Hub`):
register and reconnect with their tokens (rotation and reuse, 1.2), the
claim of the device for this node, takeover of an older connection, and
unbinding. Each bound connection's push state is its
:class:`chatd.hub.delivery.Delivery`.
"""

from twisted.internet import defer

from chatd.hub import tokens
from chatd.hub.delivery import Delivery
from chatd.wire.packets import PacketError


class Superseded(Exception):
    """A remote's claim lost: the device was bound elsewhere with a higher
    epoch while the claim was on its way."""


#: the reason of the bad_token that answers a reused token
REUSED = ("this id (%s) was used elsewhere with an old token; every token of it is "
          "revoked: register again")


class Binding:
    """The binding half of the hub (``sessions``, ``store``, ``remote``,
    ``settings`` are the hub's)."""

    def _bind(self, conn, device, token_hashes, epoch, receipts=False):
        old = self.sessions.get(device)
        if old is not None:
            if old.epoch > epoch:
                return None
            self._drop(old, "session_replaced",
                       "%s connected again elsewhere; this connection is closed" % device)
        delivery = Delivery(self, device, conn, token_hashes, epoch, receipts)
        self.sessions[device] = delivery
        conn.delivery = delivery
        return delivery

    def _drop(self, delivery, code, reason):
        """Unbind a delivery's connection, then close it with an error."""
        self._unbound(delivery)
        delivery.conn.kick(code, reason)

    def unbind(self, conn):
        """The connection is gone (or failed to finish binding)."""
        if conn.delivery is not None:
            self._unbound(conn.delivery)

    def _unbound(self, delivery):
        """The one way a binding ends: the delivery stops, the connection
        forgets it, the device is free here and in the store."""
        delivery.close()
        delivery.conn.delivery = None
        if self.sessions.get(delivery.device) is delivery:
            del self.sessions[delivery.device]
        self.remote.release(delivery.device, delivery.epoch)

    @staticmethod
    def delivery(conn):
        """The Delivery of a bound connection, or None."""
        return conn.delivery

    def _check_rebind(self, conn, device):
        bound = conn.device
        if bound is not None and bound != device:
            raise PacketError("forbidden", "this connection is bound to %s; open "
                              "another connection for %s" % (bound, device))

    # -- packets -----------------------------------------------------------------

    def register(self, conn, device, proof, receipts=False):
        """:meth:`_register` in this node's turn of binds (chatd.hub.turns)."""
        return self.binds.run(conn, self._register, conn, device, proof, receipts)

    def reconnect(self, conn, device, token, receipts=False):
        """:meth:`_reconnect` in this node's turn of binds (chatd.hub.turns)."""
        return self.binds.run(conn, self._reconnect, conn, device, token, receipts)

    @defer.inlineCallbacks
    def _register(self, conn, device, proof, receipts=False):
        """Register ``device`` on ``conn``: a new token, older ones revoked, any
        other connection of the id replaced, waiting messages pushed.
        ``receipts``: the device opts in to receipts (stored before the reply)."""
        self._check_rebind(conn, device)
        s = self.settings
        ticket_ms = tokens.ticket_ms(s, device, proof, self.clock.seconds())
        token = tokens.new_token()
        token_hash = tokens.token_hash(token)
        current = self.delivery(conn)
        # claim: the first register of an id keeps it (re-registering on the
        # connection that holds it is still fine)
        status = yield self.store.register(
            device, token_hash, claim=s.registration == "claim" and current is None,
            ticket=proof if ticket_ms else None, ticket_ms=ticket_ms, receipts=receipts)
        if status == "taken":
            raise PacketError("forbidden", "%s is registered already and this server "
                              "lets only its first register keep it; reconnect with its "
                              "token, or ask the operator to revoke it" % device,
                              field="sender")
        if status == "used":
            raise PacketError("forbidden", "this proof was used already; each is good "
                              "for one register: get a new one", field="proof")
        current = self.delivery(conn)
        if current is not None:
            # registering again on the same connection: a new token, same pushes
            current.token_hashes = (token_hash,)
            current.receipts = receipts
            conn.registered(device, token)
            return
        yield self._start(conn, device, (token_hash,),
                          lambda pending: conn.registered(device, token), receipts=receipts)

    @defer.inlineCallbacks
    def _reconnect(self, conn, device, token, receipts=False):
        """Bind ``conn`` to ``device`` with its token. With token rotation
        (the default) the reply carries a new token; the one presented stays
        valid until the new one has been used once (see chatd/store/lua/token.lua)."""
        self._check_rebind(conn, device)
        presented = tokens.token_hash(token)
        new = tokens.new_token() if self.settings.token_rotation else None
        status = yield self.store.use_token(device, presented,
                                            tokens.token_hash(new) if new else None,
                                            receipts=receipts)
        self._check_use(conn, device, status)
        valid = (tokens.token_hash(new), presented) if new else (presented,)
        token = new or token
        current = self.delivery(conn)
        if current is not None:
            current.token_hashes = valid
            current.receipts = receipts
            pending, _, _ = yield self.store.fetch(device, current.last_id, 0)
            conn.reconnected(device, pending, token)
            return
        yield self._start(conn, device, valid,
                          lambda pending: conn.reconnected(device, pending, token),
                          rotated=bool(new), receipts=receipts)

    def _check_use(self, conn, device, status):
        """A token's use (store.use_token) that is not valid: PacketError
        bad_token, after a reuse is logged and counted (the store has
        revoked every token of the id and told the node holding it)."""
        if status in ("newest", "prev"):
            return
        if status == "reuse":
            self.token_reuse += 1
            self.log.warn("security: {device} presented an old token that was used "
                          "again after its successor (a copy?); every token of it is "
                          "revoked (node {node}, from {peer})", device=device,
                          node=self.node_id, peer=conn.peer())
            raise PacketError("bad_token", REUSED % device, field="token")
        if status == "reused":  # revoked by a reuse before: say why again
            raise PacketError("bad_token", REUSED % device, field="token")
        raise PacketError("bad_token", "the token is wrong or revoked for %s; "
                          "register again to get a new one" % device, field="token")

    @defer.inlineCallbacks
    def _start(self, conn, device, token_hashes, announce, rotated=False, receipts=False):
        """Claim ``device`` for ``conn``, bind it, push what waits. After a
        rotation the claim holds only while the new token is still the
        newest (two copies of one token at once: the bind that keeps the id
        is the one with the valid token)."""
        try:
            if conn.closed:  # given up on meanwhile: claim nothing, kick no one
                return
            epoch = yield self.remote.claim(device, token_hashes[0] if rotated else None,
                                            int(conn.opened_at * 1000))
        except Superseded:
            epoch = None
        delivery = None
        if epoch is not None and not conn.closed:
            delivery = self._bind(conn, device, token_hashes, epoch, receipts)
        if delivery is None:
            if epoch is not None:
                self.remote.release(device, epoch)
            conn.kick("session_replaced", "%s connected at the same time elsewhere; "
                      "this connection is closed" % device)
            return
        try:
            yield delivery.start(announce)
        except Exception:
            self.unbind(conn)
            raise
        if self.store.uses_outboxes:
            # receipts a node left in this device's outbox when it died
            # between an ack's two steps (Redis Cluster; chatd.store.receipts)
            self.store.sweep_outboxes([device]).addErrback(
                lambda f: self.log.warn("sweeping the outbox of {d}: {why}", d=device,
                                        why=f.value))
