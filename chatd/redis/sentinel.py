"""
Redis Sentinel: where the primary is, asked of the sentinels at every connect.

Why a room of its own: with ``redis+sentinel://`` the store's address is not
configured but discovered, and a failover changes it. chatd's store client
and its pub/sub subscriber (chatd.redis.client, chatd.redis.subscriber) keep their own
txredisapi factories, deadlines and hot path; all they need from Sentinel is
*where to connect*. So this is a Twisted client endpoint whose every
``connect()`` first asks the sentinels. txredisapi's reconnecting factory
calls ``connect()`` again after every lost connection, so a failover is
followed the way any outage is: the old primary's connection drops (or the
store client cuts it: a write refused with ``READONLY``, a call past its
deadline), the next connect asks the sentinels and reaches the new primary.

txredisapi's own Sentinel support (``SentinelRedisProtocol``) was not used:
it replaces the connection factory and pool, which is where chatd keeps its
pipelining and deadlines, and it has no per-ask deadline.

Never a write to a replica, nor to a stale primary: every sentinel is asked
and the answer of the newest configuration (``config-epoch``) is followed,
and the server it names is asked ``ROLE`` before chatd connects to it; one
that is not a primary is not used, and the next attempt asks again. A
replica refuses writes anyway (``READONLY``), which the store client turns
into ``unavailable`` and a reconnect.

The questions go over short connections of their own with a tiny RESP
exchange (:class:`_Ask`, hiredis parsing): one command, one reply, a deadline.
A failover is also followed at once, not only when the old primary's
connections drop: while connected, the endpoint listens on every sentinel
for ``+switch-master`` (:class:`_Watch`, a reconnecting subscriber per
sentinel) and cuts its connection when the master moves elsewhere. A
manual failover (``SENTINEL FAILOVER``) leaves the old primary running and
writable for seconds before the sentinels make it a replica; without this,
chatd's writes there would be lost on its resync (or, with --store-acks,
answered ``unavailable`` all that time).

Sentinels with a password (their own ``requirepass``) are asked after an
``AUTH`` with ``--sentinel-password-file``'s password. The data nodes'
password (``--redis-password-file`` or the URL's) goes to whatever primary
the sentinels name: whoever controls the sentinels can learn it, so run
them where only the operator can. TLS (``rediss+sentinel://``) applies to
the primary's connection.
"""

import hiredis
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger

from chatd.redis.resp import encode_command


class SentinelError(Exception):
    """No primary could be found through the sentinels (now)."""


class UnknownMaster(SentinelError):
    """Every sentinel that answered does not monitor a master of that name."""


def _auth(password):
    """The AUTH that goes first on a sentinel's connection (--sentinel-password-file)."""
    return encode_command(b"AUTH", password) if password else b""


class _Ask(protocol.Protocol):
    """Send one command (after an AUTH when the sentinels have a password),
    fire ``self.done`` with its one reply (or a refused AUTH's), hang up."""

    def __init__(self, args, password=None):
        self.args = args
        self.password = password
        self.done = defer.Deferred()
        self._reader = hiredis.Reader()
        self._auth_reply = bool(password)  # the next reply is the AUTH's

    def connectionMade(self):
        self.transport.write(_auth(self.password) + encode_command(*self.args))

    def dataReceived(self, data):
        self._reader.feed(data)
        reply = self._reader.gets()
        while reply is not False and not self.done.called:
            if self._auth_reply and not isinstance(reply, hiredis.ReplyError):
                self._auth_reply = False  # accepted: the command's reply is next
                reply = self._reader.gets()
                continue
            self.done.callback(reply)
            self.transport.loseConnection()

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.errback(reason)


@defer.inlineCallbacks
def ask(reactor, host, port, timeout, *args, password=None):
    """One command to ``host:port`` on a connection of its own; its reply
    (an error reply comes back as a ``hiredis.ReplyError`` value)."""
    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    factory = protocol.Factory.forProtocol(lambda: _Ask(args, password))
    factory.noisy = False  # one per question: not worth two log lines each
    conn = yield endpoint.connect(factory).addTimeout(timeout, reactor)
    try:
        reply = yield conn.done.addTimeout(timeout, reactor)
    finally:
        if conn.transport.connected:
            conn.transport.abortConnection()
    return reply


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _Watch(protocol.Protocol):
    """SUBSCRIBE +switch-master on one sentinel; tells the endpoint of every
    switch of its master."""

    def __init__(self, endpoint):
        self.endpoint = endpoint
        self._reader = hiredis.Reader()

    def connectionMade(self):
        self.transport.write(_auth(self.endpoint.target.sentinel_password)
                             + encode_command(b"SUBSCRIBE", b"+switch-master"))

    def dataReceived(self, data):
        self._reader.feed(data)
        reply = self._reader.gets()
        while reply is not False:
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                # "<master> <old ip> <old port> <new ip> <new port>"
                parts = reply[2].split()
                if len(parts) == 5 and _text(parts[0]) == self.endpoint.target.master:
                    self.endpoint.switched(_text(parts[3]), int(parts[4]))
            reply = self._reader.gets()


class SentinelEndpoint:
    """An ``IStreamClientEndpoint`` for "the primary of ``target.master``".

    ``connect()`` asks every sentinel, takes the primary of the newest
    configuration (highest ``config-epoch``), checks with ``ROLE`` that it
    is one, then connects to it (with TLS for ``rediss+sentinel``)."""

    log = Logger()

    def __init__(self, reactor, target, timeout, tls_options=None):
        self.reactor = reactor
        self.target = target
        self.timeout = timeout
        self.tls_options = tls_options  # callable (host) -> client TLS options
        self.primary = None  # (host, port) last connected to
        self._conn = None    # the protocol connected through here last
        self._watches = []   # ClientServices subscribed to +switch-master

    @defer.inlineCallbacks
    def find_primary(self):
        """(host, port) of the primary; SentinelError when none can be found
        now, UnknownMaster when every sentinel that answered does not know
        the name.

        Every sentinel is asked (at once) and the answer with the highest
        ``config-epoch`` wins: right after a failover only the sentinel that
        ran it may know the new primary, while the others still name the old
        one, which may already be running again (restarted on its own data)
        and saying it is a primary until the sentinels make it a replica.
        Following a stale answer there would store and read messages on a
        server about to be wiped by its resync."""
        name = self.target.master
        asked = [ask(self.reactor, h, p, self.timeout, b"SENTINEL", b"MASTER", name,
                     password=self.target.sentinel_password)
                 for h, p in self.target.sentinels]
        replies = yield defer.DeferredList(asked, consumeErrors=True)
        problems, unknown, best = [], 0, None
        for sentinel, (ok, reply) in zip(self.target.sentinels, replies):
            where = "%s:%d" % sentinel
            if not ok:
                problems.append("%s: %s" % (where, reply.getErrorMessage() or reply.type.__name__))
            elif isinstance(reply, hiredis.ReplyError):
                if "no such master" in str(reply).lower():
                    unknown += 1
                    problems.append("%s does not know a master named %r" % (where, name))
                else:
                    problems.append("%s: %s" % (where, reply))
            else:
                fields = dict(zip(reply[::2], reply[1::2]))
                epoch = int(fields.get(b"config-epoch", 0))
                if best is None or epoch > best[0]:
                    best = (epoch, _text(fields[b"ip"]), int(fields[b"port"]), where)
        if best is None:
            if unknown and unknown == len(problems):
                raise UnknownMaster("no sentinel knows a master named %r (asked %s)" % (
                    name, ", ".join("%s:%d" % s for s in self.target.sentinels)))
            raise SentinelError("no sentinel answered for %r: %s" % (name, "; ".join(problems)))
        epoch, host, port, where = best
        try:
            role = yield ask(self.reactor, host, port, self.timeout, b"ROLE")
        except Exception as e:
            raise SentinelError("the primary %s:%d (epoch %d, from %s) does not answer: %s"
                                % (host, port, epoch, where, e.__class__.__name__))
        if isinstance(role, hiredis.ReplyError) and "NOAUTH" in str(role):
            return host, port  # it wants the password: the real connection has it
        if isinstance(role, list) and role and role[0] == b"master":
            return host, port
        raise SentinelError("%s:%d, named by %s (epoch %d), is not a primary (yet)"
                            % (host, port, where, epoch))

    @defer.inlineCallbacks
    def connect(self, factory):
        host, port = yield self.find_primary()
        if (host, port) != self.primary:
            self.log.info("store primary for {master}: {host}:{port}",
                          master=self.target.master, host=host, port=port)
            self.primary = (host, port)
        endpoint = HostnameEndpoint(self.reactor, host, port, timeout=self.timeout)
        if self.target.tls:
            from twisted.internet.endpoints import wrapClientTLS
            endpoint = wrapClientTLS(self.tls_options(host), endpoint)
        conn = yield endpoint.connect(factory)
        self._conn = conn
        if not self._watches:
            self._watch()
        return conn

    def _watch(self):
        for host, port in self.target.sentinels:
            factory = protocol.Factory.forProtocol(lambda: _Watch(self))
            factory.noisy = False
            service = ClientService(HostnameEndpoint(self.reactor, host, port,
                                                     timeout=self.timeout),
                                    factory, retryPolicy=backoffPolicy(0.5, maxDelay=5),
                                    clock=self.reactor)
            service.startService()
            self._watches.append(service)

    def switched(self, host, port):
        """The sentinels moved the master to host:port: leave the old one
        now (the next connect asks the sentinels again)."""
        if self.primary == (host, port):
            return
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None and conn.transport.connected:
            self.log.info("the sentinels moved {master} to {host}:{port}; leaving "
                          "{old[0]}:{old[1]}", master=self.target.master, host=host,
                          port=port, old=self.primary)
            conn.transport.abortConnection()

    def close(self):
        """Stop listening to the sentinels; Deferred."""
        watches, self._watches = self._watches, []
        return defer.gatherResults([w.stopService() for w in watches], consumeErrors=True)
