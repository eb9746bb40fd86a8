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

Errors of txredisapi are turned into chatd's here too (:func:`is_error_reply`,
:data:`ConnectionLost`), so the store client names no txredisapi class.
"""

import dataclasses

import txredisapi
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import Logger

from chatd.redis.resp import encode_command
from chatd.redis.sentinel import SentinelEndpoint
from chatd.redis.tls import tls_options
from chatd.netio import write_now

#: an error reply of the store (``-ERR ...``), as txredisapi raises it
ErrorReply = txredisapi.ResponseError
#: what txredisapi raises for a call on a lost connection
ConnectionLost = txredisapi.ConnectionError

_log = Logger(namespace="chatd.redis")


class _Protocol(txredisapi.RedisProtocol):
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

    def execute_command(self, *args, **kwargs):
        """Write one command; Deferred of its reply. txredisapi's version wraps
        each reply in a second Deferred for its per-call timeout, which chatd
        does not use (see RedisClient's watchdog)."""
        if kwargs or self.pipelining or self.inMulti:
            return super().execute_command(*args, **kwargs)
        if self.connected == 0:
            raise txredisapi.ConnectionError("Not connected")
        write_now(self.transport, self._build_command(*args))  # no wait for a poll
        return self.replyQueue.get().addCallback(self.handle_reply)


class _SubscriberProtocol(txredisapi.SubscriberProtocol):
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
    for name, value in attributes.items():
        setattr(factory, name, value)
    endpoint = endpoint_for(t, timeout, reactor)
    # txredisapi fails this Deferred when AUTH is refused (and stops
    # retrying); the owner says so plainly (the store client does), or it is
    # dropped here rather than left as an unhandled error
    factory.deferred.addErrback(getattr(attributes.get("owner"), "_auth_failed",
                                        lambda f: None))
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
    ConnectionLost and reconnects."""
    conn.transport.abortConnection()
