"""
Every use of txredisapi's internals, in one place.

txredisapi keeps chatd's store connections: it connects, authenticates,
selects the database and reconnects with back-off. chatd needs three things
it does not offer as API, so they are done here, against its internals
(``RedisProtocol``, ``RedisFactory.pool``, ``replyQueue``), and nowhere else;
an upgrade of txredisapi is checked against this module alone:

* a faster hot path: our own RESP encoder (:func:`chatd.redis.resp.encode_command`)
  and hiredis replies handed straight to their callers, with no per-call
  timeout Deferred (the store client keeps deadlines with one watchdog);
* a word when a connection is ready (after AUTH and SELECT), so that the
  function library goes out before any queued call;
* the sharded pub/sub replies (``smessage``, ``ssubscribe``), which
  txredisapi's subscriber protocol does not know.

Error replies are named here too (:data:`ErrorReply`), so the store client
names no txredisapi class.
"""

import dataclasses

import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import Logger

from chatd.redis.resp import encode_command
from chatd.redis.sentinel import SentinelEndpoint
from chatd.redis.tls import tls_options
from chatd.netio import write_now

#: an error reply of the store (``-ERR ...``), as txredisapi raises it
ErrorReply = txredisapi.ResponseError

_log = Logger(namespace="chatd.redis")


#: seconds between connection attempts while the store refuses chatd's
#: credentials (an operator's mistake: retried slowly, with a critical log)
REFUSED_RETRY = 2.0
REFUSED_RETRY_MAX = 15.0


class _Handshake:
    """AUTH and SELECT, as txredisapi does them, except for what a failure
    means. txredisapi stops reconnecting for good after any failure during
    AUTH, a connection lost in the middle (a network blip, a TLS failure)
    included, which left a node without its store until it was restarted.
    Here only an error reply of the store (``-WRONGPASS``, ``-NOAUTH``, a bad
    database) is a refusal, and even that is retried, slowly
    (:meth:`ConnectionFactory.refused`); a lost connection is an outage like
    any other, retried at once."""

    @defer.inlineCallbacks
    def connectionMade(self):
        try:
            if self.password is not None:
                reply = yield self.auth(self.password, self.username)
                if isinstance(reply, ErrorReply):
                    raise reply
            if self.dbid is not None:
                reply = yield self.select(self.dbid)
                if isinstance(reply, ErrorReply):
                    raise reply
        except ErrorReply as e:
            self.factory.refused(str(e))
            self.transport.loseConnection()
            return
        except Exception:
            self.transport.loseConnection()  # lost: the slot reconnects
            return
        self.factory.accepted()
        self._ready = True
        waiting, self._waiting_for_connect = self._waiting_for_connect, []
        for d in waiting:
            d.callback(self)


class _Protocol(_Handshake, txredisapi.RedisProtocol):
    """txredisapi's protocol (hiredis-backed when hiredis is installed) with
    :func:`encode_command` as its encoder."""

    def _build_command(self, *args, **kwargs):
        return encode_command(*args)

    def dataReceived(self, data, unpause=False):
        """Hand each parsed reply to its caller. txredisapi's version also
        converts values and tracks MULTI, neither of which chatd uses (bytes
        stay bytes: charset None, convertNumbers False)."""
        if self.inTransaction or self.transactions or not hasattr(self, "_reader"):
            return super().dataReceived(data, unpause)
        reader = self._reader
        reader.feed(data)
        put = self.replyQueue.put
        reply = reader.gets()
        while reply is not False:
            put(reply)
            reply = reader.gets()

    _corked = None  # the commands of this reactor turn, written at its end

    def execute_command(self, *args, **kwargs):
        """Write one command; Deferred of its reply. txredisapi's version wraps
        each reply in a second Deferred for its per-call timeout, which chatd
        does not use (see RedisClient's watchdog).

        The commands of one reactor turn go out in one write at its end
        (``callLater(0)``, before the next poll): in a reconnect storm a turn
        binds hundreds of devices, three store calls each, and a ``send``
        per call on the store's socket (waking the store each time) was a
        fifth of chatd's time."""
        if kwargs or self.pipelining or self.inMulti:
            self._uncork()  # what was written before goes first
            return super().execute_command(*args, **kwargs)
        if self.connected == 0:
            raise txredisapi.ConnectionError("Not connected")
        data = self._build_command(*args)
        if self._corked is None:
            self._corked = [data]
            self.factory.clock.callLater(0, self._uncork)
        else:
            self._corked.append(data)
        return self.replyQueue.get().addCallback(self.handle_reply)

    def _uncork(self):
        corked, self._corked = self._corked, None
        if corked and self.connected:
            write_now(self.transport, b"".join(corked))  # no wait for a poll


class _SubscriberProtocol(_Handshake, txredisapi.SubscriberProtocol):
    """txredisapi does AUTH and SELECT; after that every reply is a pub/sub
    event for the factory's owner (txredisapi knows only the unsharded
    ``message``/``subscribe``)."""

    def replyReceived(self, reply):
        if not self._ready:
            return super().replyReceived(reply)
        self.factory.owner._reply(self, reply)

    def connectionLost(self, why):
        super().connectionLost(why)
        self.factory.owner._lost(self)


class ConnectionFactory(txredisapi.RedisFactory):
    """Tells its ``owner`` (``_connected(conn)``) when a connection is ready
    (authenticated, database selected)."""

    protocol = _Protocol
    # reconnect soon after the store is back
    initialDelay = 0.2
    maxDelay = 2
    _refused_logged = None

    def refused(self, why):
        """The store refused the credentials (or the database): say so,
        critically (once a minute at most), and retry slowly: an operator
        may fix the store's password without restarting chatd."""
        self.initialDelay, self.maxDelay = REFUSED_RETRY, REFUSED_RETRY_MAX
        now = self.clock.seconds()
        if self._refused_logged is None or now - self._refused_logged >= 60:
            self._refused_logged = now
            _log.critical(
                "the store {store} refused chatd's credentials or database ({why}); "
                "retrying every {delay:g}s or so: fix the password "
                "(--redis-password-file) or the store", store=self.uuid, why=why,
                delay=REFUSED_RETRY)

    def accepted(self):
        """Connected and authenticated: reconnect soon again after a loss."""
        if self._refused_logged is not None:
            _log.info("the store {store} accepted chatd's credentials", store=self.uuid)
            self._refused_logged = None
        self.initialDelay, self.maxDelay = type(self).initialDelay, type(self).maxDelay

    def addConnection(self, conn):
        super().addConnection(conn)
        if conn in self.pool:
            self.owner._connected(conn)


class SubscriberFactory(ConnectionFactory):
    protocol = _SubscriberProtocol


def start_factory(factory_class, target, timeout, reactor, **attributes):
    """A txredisapi factory for ``target`` (TCP, TLS or unix socket), with
    ``attributes`` set on it, connecting (and reconnecting) from now on.
    The store client and the subscriber connection (chatd.redis.subscriber) both
    connect through here."""
    t = target
    factory = factory_class(t.describe(), t.db or None, 1, True, txredisapi.ConnectionHandler,
                            None, t.password, None, False, t.username)
    factory.clock = reactor
    for name, value in attributes.items():
        setattr(factory, name, value)
    endpoint = endpoint_for(t, timeout, reactor)
    # txredisapi would fail this Deferred on a refused AUTH; _Handshake
    # never does, but an unhandled error must not be left behind
    factory.deferred.addErrback(lambda f: None)
    factory.startConnecting(endpoint)
    factory.endpoint = endpoint
    return factory


def stop_factory(factory):
    """Disconnect a factory of :func:`start_factory` (and its endpoint's
    own connections, the sentinel watch); Deferred."""
    d = factory.disconnect().addErrback(lambda f: None)
    close = getattr(factory.endpoint, "close", None)
    if close is not None:
        d.addBoth(lambda _: close()).addErrback(lambda f: None)
    return d


def endpoint_for(target, timeout, reactor):
    """Where a connection to ``target`` goes: a unix socket, host:port (TLS
    for rediss), or whatever primary the sentinels name (chatd.redis.sentinel)."""
    t = target
    if t.sentinels:
        return SentinelEndpoint(reactor, t, timeout, lambda host: tls_options(
            dataclasses.replace(t, host=host), _log))
    if t.path:
        return UNIXClientEndpoint(reactor, t.path, timeout=timeout)
    return txredisapi._makeEndpoint(
        t.host, t.port, timeout, tls_options(t, _log) if t.tls else None)


def connection(factory):
    """The factory's ready connection, or None (txredisapi keeps it in a pool
    of one)."""
    if factory is None or not factory.pool:
        return None
    conn = factory.pool[0]
    return conn if conn.connected else None


def write(conn, *args):
    """Write one command on a connection without waiting for its reply (a
    subscribed connection's commands are answered by events)."""
    conn.transport.write(encode_command(*args))


def cut(conn):
    """Abort a connection: txredisapi fails every call on it with
    its ConnectionError and reconnects."""
    conn.transport.abortConnection()
