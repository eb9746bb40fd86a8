"""
The terminal client's conversation with a chatd server, across connections:
one TCP connection (:class:`ServerConnection`: lines in as dicts, packets out
as lines) and the device's :class:`Session` over all of them (bind, resend,
show each pushed message once, ack, reconnect with back-off). No terminal
here: what happens is told to a ``ui``.
"""

import json

from twisted.internet import defer
from twisted.protocols.basic import LineReceiver

from chatd.client.formatting import describe_error, failure_words, plural
from chatd.client.outbox import Outbox

#: the first wait before reconnecting; it doubles after each failure ...
BACKOFF_FIRST = 0.5
#: ... up to this
BACKOFF_MAX = 10.0
#: errors after which the server closes the connection (we reconnect, except
#: after session_replaced: another client of the same id took over)
CLOSING_CODES = ("session_replaced", "shutdown", "idle_timeout", "auth_timeout",
                 "slow_consumer", "line_too_long")


def reused(error):
    """Whether a bad_token says that an old token of the id was used again
    (token rotation, 1.2): then every token of it is revoked."""
    return "used elsewhere with an old token" in str(error.get("reason", ""))


def revoked_words(device):
    """What the client says when every token of its id was revoked."""
    return ("%s: this id was used elsewhere with an old token (or the operator "
            "revoked it); every token of it is revoked: register again "
            "(chatd-client --register)" % device)


def id_order(server_id):
    """A sort key for server ids: chatd's are zero-padded decimals, but the
    contract only promises increasing strings, so compare length first."""
    return (len(server_id), server_id)


class ServerConnection(LineReceiver):
    """One TCP connection to chatd: lines in as dicts, packets out as lines.
    Everything it hears goes to its :class:`Session`."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 24

    def __init__(self, session):
        self.session = session

    def connectionMade(self):
        try:
            self.transport.setTcpKeepAlive(True)
        except (AttributeError, NotImplementedError, OSError):
            pass
        self.session.connection_made(self)

    def send(self, packet):
        self.transport.write(json.dumps(packet, separators=(",", ":")).encode() + b"\n")

    def dataReceived(self, data):
        super().dataReceived(data)
        # every line of this read is handled: one cumulative ack covers them
        self.session.batch_done(self)

    def lineReceived(self, line):
        line = line.rstrip(b"\r")
        if not line.strip():
            return
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            self.session.ui.problem("the server sent a line that is not a JSON object: %r"
                                    % line[:80])
            return
        self.session.received(self, reply, line)

    def lineLengthExceeded(self, line):
        self.session.ui.problem("the server sent a line over %d bytes; dropping the "
                                "connection" % self.MAX_LENGTH)
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self.session.connection_lost(self, reason)


class Session:
    """One device's conversation with a server, across connections.

    It binds each new connection (``reconnect`` with the saved token, else
    ``register``, and ``register`` again if the token is refused), resends
    every unanswered message with its ``ref`` once bound, shows each pushed
    message once (ids at or below the highest shown are dropped) and acks
    after each read, and reconnects with back-off when the connection drops.

    What happens is told to ``ui`` (``notice``, ``problem``, ``incoming``,
    ``answered``, ``fatal``). ``connect(protocol)`` opens a connection (a
    Deferred); ``clock`` schedules. Neither is a terminal or a socket here, so
    the whole state machine can be tested with a fake transport.

    ``one_shot`` (``--send``): with a saved token, messages go out as one-shot
    sends (sender + token) on an unbound connection, so a client of the same
    id running elsewhere is not replaced; pushes are neither shown nor acked.
    ``retry_first`` False: give up (``fatal`` 2) if the very first connection
    attempt fails.
    """

    def __init__(self, device, tokens, ui, connect, clock, where, *,
                 new_token=False, one_shot=False, retry_first=True, receipts=False,
                 push=None):
        self.device = device
        #: (app, pushkey) to register for wake-ups once bound (--push), or None
        self.push = push
        self.tokens = tokens
        self.ui = ui
        self._connect = connect
        self.clock = clock
        self.where = where
        self.one_shot = one_shot
        self.retry_first = retry_first
        # opt in to receipts (1.2) at every bind (--no-receipts: not)
        self.opt_in = {"receipts": "true"} if receipts else {}
        self.token = None if new_token else tokens.load()
        self.outbox = Outbox(clock)  # what is typed and not answered yet
        self.conn = None             # the current ServerConnection
        self.binding = False         # a register/reconnect is unanswered
        self.ready = False           # messages may be sent on this connection
        self.shown = None            # id_order() of the highest id shown
        self.come_back = 0.0  # seconds the server asked us to wait (retry_after_ms)
        self.delay = BACKOFF_FIRST
        self.ever_connected = False
        self.failed_dials = 0        # since the last connection was made
        self.stopped = False
        self._dialing = None
        self._retry = None
        self._why_closed = None  # what to say when this connection closes
        self._cannot_show = False  # the ui could not show a message: stop acking
        self._gone = []

    # -- what the application asks --------------------------------------------------

    def start(self):
        self._dial()

    def send(self, receiver, text):
        """Queue a message; it goes out now if bound, else once bound."""
        entry = self.outbox.add(receiver, text)
        self._pump()
        return entry

    def when_idle(self):
        """Deferred that fires once every queued message is answered."""
        return self.outbox.when_idle()

    def stop(self):
        """Stop for good: no more reconnects; close the connection (letting
        the acks already written reach the server). Deferred: closed."""
        self.stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self.outbox.cancel_pause()
        if self._dialing is not None:
            self._dialing.cancel()
        if self.conn is None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._gone.append(d)
        self.conn.transport.loseConnection()
        return d

    @property
    def offline(self):
        """Not connected, and not merely making the first connection either:
        the connection was lost or could not be made."""
        return self.conn is None and (self.ever_connected or self.failed_dials > 0)

    # -- connections ---------------------------------------------------------------------

    def _dial(self):
        self._retry = None
        if self.stopped:
            return
        d = self._dialing = self._connect(ServerConnection(self))

        def failed(f):
            self._dialing = None
            if self.stopped:
                return
            self.failed_dials += 1
            words = "cannot connect to %s: %s" % (self.where, failure_words(f.value))
            if not self.ever_connected and not self.retry_first:
                self.ui.fatal(2, words)
            else:
                self._reconnect_later(words, "retrying")

        def done(result):
            self._dialing = None

        d.addCallbacks(done, failed)

    def _reconnect_later(self, why, verb):
        delay, self.delay = self.delay, min(self.delay * 2, BACKOFF_MAX)
        # a server that stops says when to come back (retry_after_ms, 1.2):
        # its clients then do not all come back at once
        delay, self.come_back = max(delay, self.come_back), 0.0
        self.ui.notice("%s; %s in %.1f s" % (why, verb, delay))
        self._retry = self.clock.callLater(delay, self._dial)

    def connection_made(self, conn):
        if self.stopped:
            conn.transport.abortConnection()
            return
        self.ever_connected = True
        self.failed_dials = 0
        self.conn = conn
        self._why_closed = None
        self.pushed_here = None  # the last id pushed on this connection
        self.acked_here = None   # the last id acked on it
        if self.token and self.one_shot:
            self._ready()
        else:
            self._bind()

    def _bind(self):
        self.binding = True
        if self.token:
            self.conn.send(dict({"reconnect": "true", "sender": self.device,
                                 "token": self.token}, **self.opt_in))
        else:
            self.conn.send(dict({"register": "true", "sender": self.device}, **self.opt_in))

    def _ready(self):
        self.ready = True
        self.delay = BACKOFF_FIRST
        if self.push is not None:
            app, pushkey = self.push
            self.conn.send({"push": pushkey, "app": app})
        self._pump()

    def connection_lost(self, conn, reason):
        if conn is not self.conn:
            return
        self.conn = None
        self.binding = self.ready = False
        self.outbox.connection_lost()
        gone, self._gone = self._gone, []
        for d in gone:
            d.callback(None)
        if self.stopped:
            return
        self._reconnect_later(self._why_closed or "connection lost", "reconnecting")

    # -- what the server says ---------------------------------------------------------------

    def received(self, conn, reply, raw):
        if conn is not self.conn:
            return
        kind = reply.get("type")
        if kind == "message" or kind == "receipt":
            self._pushed(reply, raw)
        elif kind == "ping":
            conn.send({"ping": "keepalive"})  # the server's liveness check
        elif kind == "registered":
            self._registered(reply)
        elif kind == "reconnected":
            # the next token (1.2) first, before anything else happens here:
            # the one presented stays valid only until this one is used
            self._keep_token(reply.get("token"))
            self.binding = False
            pending = reply.get("pending")
            self.ui.notice("connected to %s as %s%s" % (
                self.where, self.device,
                "; %s waiting" % plural(pending, "message") if pending else ""))
            self._ready()
        elif kind in ("accepted", "duplicate"):
            self._answered(reply)
        elif kind == "push_set":
            self.ui.notice("push wake-ups: %s" % (
                "registered for app %s" % reply["app"] if reply.get("app") else "off"))
        elif kind == "error":
            self._error(reply)
        # pong, and types a newer server may add: nothing to do

    def _keep_token(self, token):
        """A reconnect's next token (token rotation, 1.2): kept and saved at
        once (:meth:`TokenFile.replace`). A 1.0 server sends none."""
        if isinstance(token, str) and token and token != self.token:
            self.token = token
            self.tokens.replace(token, self.ui.problem)

    def _registered(self, reply):
        self.binding = False
        token = reply.get("token")
        self.token = token
        # a new registration may be on a new store whose ids start again at
        # 1: showing a message twice is better than hiding one
        self.shown = None
        try:
            self.tokens.save(token)
            where = "token saved in %s" % self.tokens.path
        except OSError as e:
            where = "could not save the token in %s: %s" % (self.tokens.path, e.strerror or e)
        self.ui.notice("registered as %s at %s; %s" % (self.device, self.where, where))
        self._ready()

    def _error(self, reply):
        code = reply.get("code")
        entry = self.outbox.get(reply.get("ref"))
        if entry is not None:
            if code == "bad_token" and reused(reply):
                self.ui.fatal(1, revoked_words(self.device))
            elif code == "bad_token":
                entry.sent = False
                self._token_refused()
            elif code == "rate_limited":
                # the server says so once, then drops what follows in silence:
                # this one and every send written after it go again (same
                # ref: one that was accepted after all is answered so again)
                self.outbox.unsend_from(entry)
                self.outbox.pause(self._pump)
            else:
                self._answered(reply)
            return
        if code == "session_replaced":
            self.ui.fatal(1, "%s connected from somewhere else; this client stops (%s)"
                          % (self.device, code))
            return
        if code == "revoked" or (code == "bad_token" and reused(reply)):
            # not retried, and no register behind the user's back: if a copy
            # of the token was used, whoever holds it must not get the id back
            self.ui.fatal(1, revoked_words(self.device))
            return
        if code in CLOSING_CODES:
            after = reply.get("retry_after_ms")
            if isinstance(after, int) and not isinstance(after, bool) and after > 0:
                self.come_back = min(after / 1000.0, 600.0)
            # said when the connection closes, with when we try again
            self._why_closed = "the server closed the connection: %s" % describe_error(reply)
            return
        if self.binding:
            if code == "bad_token":
                self._token_refused()
            elif code in ("unavailable", "rate_limited"):
                # try again on a new connection, after the back-off
                self._why_closed = "cannot %s as %s: %s" % (
                    "reconnect" if self.token else "register", self.device,
                    describe_error(reply))
                self.conn.transport.loseConnection()
            else:
                self.ui.fatal(2, "cannot %s as %s: %s" % (
                    "reconnect" if self.token else "register", self.device,
                    describe_error(reply)))
            return
        self.ui.problem("error: %s" % describe_error(reply))

    def _token_refused(self):
        """The saved token is no longer valid (another register revoked it, or
        the store is new): register again, once, and say so."""
        if self.binding and not self.token:
            return  # already registering
        self.token = None
        self.ready = False
        self.ui.notice("the saved token of %s was refused (bad_token); registering again"
                       % self.device)
        self._bind()

    def _pushed(self, push, raw):
        server_id = push.get("id")
        if not isinstance(server_id, str) or not self.ready or self.one_shot \
                or self._cannot_show:
            return  # --send shows nothing and acks nothing: it all stays stored
        key = id_order(server_id)
        if self.shown is not None and key <= self.shown:
            self.pushed_here = server_id
            return  # shown before this connection; acked below all the same
        show = self.ui.receipt if push.get("type") == "receipt" else self.ui.incoming
        if show(push, raw) is False:
            self._cannot_show = True  # it, and what follows, stay stored
            return
        self.shown = key
        self.pushed_here = server_id

    def batch_done(self, conn):
        """After each read: ack the last id pushed here (cumulative)."""
        if conn is self.conn and self.pushed_here is not None \
                and self.pushed_here != self.acked_here:
            self.acked_here = self.pushed_here
            conn.send({"ack": self.pushed_here})

    def _answered(self, reply):
        entry = self.outbox.pop(reply.get("ref"))
        if entry is None:
            return  # not a reply to one of ours (cannot happen with chatd)
        self.ui.answered(entry, reply)
        self._pump()
        self.outbox.fire_if_idle()

    # -- sending ---------------------------------------------------------------------------

    def _pump(self):
        """Write what the outbox lets through, once messages may be sent."""
        if self.ready and self.conn is not None:
            self.outbox.pump(self._write)

    def _write(self, entry):
        packet = {"message": entry.text, "receiver": entry.receiver, "ref": entry.ref}
        if self.one_shot and not self.binding and self.token:
            packet.update(sender=self.device, token=self.token)
        self.conn.send(packet)
