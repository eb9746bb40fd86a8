"""
The one connection to the store, and the one path every call takes.

txredisapi keeps the connection: it connects, authenticates, selects the
database and reconnects with back-off. But it waits forever for a connection
while Redis is down, and a reply that never comes keeps its caller waiting
too. Here every call has a deadline (``--redis-timeout``), and every way it
can fail (deadline, lost connection, refused, an error reply) comes out as
:class:`StoreUnavailable`, which the protocol answers with ``unavailable``.

The hot path is lean, because every chat message is one call: commands go
straight to the connected protocol (not through txredisapi's per-call
connection lookup), arguments are encoded once, replies are parsed by hiredis,
and deadlines are kept by one watchdog instead of a timer per call. The
watchdog can do that because one pipelined connection answers in order: if
the oldest call in flight is past its deadline the connection is stuck, and it
is cut (failing every call on it, and reconnecting).

The Lua lives in ``chatd/lua/<name>.lua`` (after the shared ``_prelude.lua``)
and runs as one Valkey/Redis *function library* (``FUNCTION LOAD``, ``FCALL``;
Redis >= 7.0 or Valkey), not as EVALSHA scripts. A script cache is empty after
every store start, failover or ``SCRIPT FLUSH``, and falling back to EVAL for
the one call that met ``NOSCRIPT`` let later calls run first: messages of one
connection stored out of order. Functions are kept with the data (AOF/RDB)
and replicated, and the library is loaded again on every (re)connection
before any queued call is released, on the same pipelined connection, so no
call can meet a store without it. Should an operator delete it anyway
(``FUNCTION FLUSH``), the calls that meet that fail as ``unavailable`` and the
library is loaded again; nothing runs out of order (see :meth:`RedisClient.script`).
"""

import collections
import dataclasses
import hashlib
import os
import re

import txredisapi
from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import Logger

from chatd.app import config
from chatd.wire.output import write_now
from chatd.ops.stats import StoreStats

LUA_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "store", "lua")


class StoreUnavailable(Exception):
    """The store could not do what was asked in time; nothing can be assumed
    stored (a reply lost after the store acted is possible: clients retry with
    a ``ref``)."""


#: a line ``-- flag: allow-oom`` in a script's text gives its function that
#: flag. A function without it is refused up front (whole, before it runs)
#: while the store is over its ``maxmemory``; only the steps that just read
#: or delete (fetch, ack) have it, so that a full store can still drain.
_FLAGS = re.compile(rb"^-- flag: ([a-z-]+)", re.M)


class StoreFull(StoreUnavailable):
    """The store refused a write because it is at its memory limit
    (``maxmemory``, policy ``noeviction``): nothing of it was stored."""


class Redirected(StoreUnavailable):
    """A Redis Cluster redirection or refusal (``MOVED slot host:port``,
    ``ASK slot host:port``, ``TRYAGAIN``, ``CLUSTERDOWN``): the command did
    not run. Only :class:`chatd.redis.cluster.ClusterClient` sees these (it retries);
    ``kind`` is the first word, ``address`` (host, port) or None."""

    def __init__(self, message):
        super().__init__(message)
        words = message.split()
        self.kind = words[0] if words else ""
        self.address = None
        if self.kind in ("MOVED", "ASK") and len(words) >= 3:
            host, _, port = words[2].rpartition(":")
            self.address = (host, int(port))


#: the first words of the error replies that are cluster redirections
REDIRECTS = ("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN")


class Library:
    """chatd's Lua as one function library: ``_prelude.lua`` once, then each
    ``chatd/lua/<name>.lua`` as the body of a function ``chatd_<v>_<name>``
    (its KEYS and ARGV are the function's arguments, so a body reads as a
    script). ``<v>`` is a hash of the whole source: nodes of two versions
    (a rolling upgrade) share a store without replacing each other's code."""

    def __init__(self, lua_dir=LUA_DIR):
        names = sorted(f[:-4] for f in os.listdir(lua_dir)
                       if f.endswith(".lua") and not f.startswith("_"))
        bodies = [(n, _read_lua(lua_dir, n)) for n in names]
        prelude = _read_lua(lua_dir, "_prelude")
        version = hashlib.sha1(prelude + b"".join(b for _, b in bodies)).hexdigest()[:12]
        self.name = "chatd_" + version
        parts = [b"#!lua name=%s\n" % self.name.encode(), prelude]
        self.functions = {}
        for n, body in bodies:
            fname = ("%s_%s" % (self.name, n)).encode("ascii")
            self.functions[n] = fname
            flags = b", ".join(b"'%s'" % f for f in _FLAGS.findall(body))
            parts.append(b"\nlocal function %s(KEYS, ARGV)\n%s\nend\n"
                         b"redis.register_function{function_name='%s', callback=%s, "
                         b"flags={%s}}\n" % (n.encode(), body, fname, n.encode(), flags))
        self.source = b"".join(parts)


def _read_lua(lua_dir, name):
    with open(os.path.join(lua_dir, name + ".lua"), "rb") as f:
        return f.read()


def _arg(value):
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return str(value).encode("ascii")


def encode_command(*args):
    """One command in RESP, in a single pass (txredisapi's encoder runs
    several type checks and a str.format per argument and per length)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if a.__class__ is not bytes:
            a = _arg(a)
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


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
        from chatd.redis.sentinel import SentinelEndpoint
        return SentinelEndpoint(reactor, t, timeout, lambda host: tls_options(
            dataclasses.replace(t, host=host), RedisClient.log))
    if t.path:
        return UNIXClientEndpoint(reactor, t.path, timeout=timeout)
    return txredisapi._makeEndpoint(
        t.host, t.port, timeout, tls_options(t, RedisClient.log) if t.tls else None)


class RedisClient:
    """A txredisapi connection with deadlines on every call."""

    log = Logger()

    def __init__(self, target, timeout, reactor, library=True, acks=0):
        self.target = target
        self.timeout = timeout
        self.reactor = reactor
        # False: a connection that only reads (a cluster seed asked for the
        # topology, which may be a replica): no FUNCTION LOAD on it
        self.library = library
        self.acks = acks          # --store-acks: replicas that must confirm a write
        self._unconfirmed = []    # (call Deferred, caller's Deferred) since the last WAIT
        self._confirming = False  # a WAIT is in flight
        self._library = Library()
        self._reloading = False
        self._factory = None
        self._sent = collections.deque()     # (deadline, Deferred) in send order
        self._waiting = collections.deque()  # (deadline, args, Deferred) until connected
        self._watchdog = None
        self._ticks = 0
        self._overdue = None  # the call found overdue, awaiting confirmation
        self._offset = None   # the store's clock minus ours, in ms
        self._ready = []
        self.stats = StoreStats()  # read by chatd.ops.metrics

    # -- lifecycle ---------------------------------------------------------------

    def connect(self):
        self._factory = start_factory(ConnectionFactory, self.target, self.timeout,
                                      self.reactor, owner=self)
        self._watchdog = task.LoopingCall(self._check_deadlines)
        self._watchdog.clock = self.reactor
        self._watchdog.start(min(self.timeout / 4, 0.25), now=False)
        return self

    def _auth_failed(self, failure):
        self.log.error("the store {store} refused chatd's credentials ({why}); chatd "
                       "will not try again: fix the password (--redis-password-file) "
                       "and restart", store=self.target.describe(),
                       why=failure.getErrorMessage())

    def when_connected(self, timeout):
        """Deferred that fires once connected, or after ``timeout`` regardless
        (with False), so that a node can start while its store is down."""
        if self._conn() is not None:
            return defer.succeed(True)
        d = defer.Deferred()
        self._ready.append(d)
        return d.addTimeout(timeout, self.reactor, onTimeoutCancel=lambda *_: False)

    def close(self):
        """Disconnect; the Deferred fires when the connection is gone."""
        factory, self._factory = self._factory, None
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._fail_waiting(lambda deadline: True, "the store client is closing")
        ready, self._ready = self._ready, []
        for d in ready:
            d.callback(False)
        if factory is None:
            return defer.succeed(None)
        return stop_factory(factory)

    # -- calls -------------------------------------------------------------------

    def call(self, *args):
        """Run one command; Deferred of its reply (bytes, int, list, None)."""
        d = self._send(args).addBoth(self._timed, args[0], self.reactor.seconds())
        return d.addErrback(self._unavailable, args[0])

    def script(self, name, keys, args):
        """Run ``chatd/lua/<name>.lua`` (a function of chatd's library);
        Deferred of its reply.

        The library is on the store before any call (see :meth:`_connected`).
        A call that finds it gone (an operator's ``FUNCTION FLUSH``) fails as
        ``unavailable`` and has the library loaded again; it is never run a
        second time behind calls sent after it, which is what would reorder
        one connection's messages."""
        d = self._send((b"FCALL", self._library.functions[name], len(keys), *keys, *args))
        if self.acks:
            d = self._confirmed(d)
        d.addBoth(self._timed, name, self.reactor.seconds())
        d.addErrback(self._missing)
        return d.addErrback(self._unavailable, name)

    # -- --store-acks ------------------------------------------------------------

    def _confirmed(self, call):
        """The caller's Deferred of a write ``call``, released only once
        ``WAIT acks`` sent after it says enough replicas hold it.

        Every function is waited for, reads too: a read may return writes of
        other connections that no replica holds yet (the fetch step then
        makes a write of no change, so that the WAIT covers what it read).

        Group commit: one WAIT in flight per connection; every write sent
        while it is out waits for the next one, which is sent when it
        returns. A WAIT covers every write sent before it on the connection,
        and the replies come in order, so each caller is released in send
        order (one connection's order is kept)."""
        d = defer.Deferred()
        self._unconfirmed.append((call, d))
        if not self._confirming:
            self._send_wait()
        return d

    def _send_wait(self):
        group, self._unconfirmed = self._unconfirmed, []
        self._confirming = True
        # WAIT blocks the connection while it waits: at most half the deadline,
        # so that the calls behind it still make theirs
        wait_ms = max(1, int(self.timeout * 500))
        self._send((b"WAIT", self.acks, wait_ms)).addBoth(self._waited, group)

    def _waited(self, replicas, group):
        self._confirming = False
        if isinstance(replicas, Failure):
            why = "no answer to WAIT (%s)" % replicas.getErrorMessage()
        elif replicas < self.acks:
            why = "%d of %d replica(s) confirmed it" % (replicas, self.acks)
        else:
            why = None
        if why is not None:
            self.stats.unconfirmed += len(group)
            self.log.warn("--store-acks {n}: {why}; {count} write(s) answered "
                          "'unavailable'", n=self.acks, why=why, count=len(group))
        for call, d in group:
            call.addBoth(self._release, d, why)
        if self._unconfirmed:
            self._send_wait()

    @staticmethod
    def _release(result, d, why):
        if why is not None and not isinstance(result, Failure):
            d.errback(StoreUnavailable(
                "written, but %s in time: it may be lost on a failover (a retry "
                "with the same ref is answered from the first)" % why))
        else:
            d.callback(result)  # a Failure errbacks

    def config_get(self, name):
        """Deferred of a store setting (bytes), or None when the store will not
        say (CONFIG renamed or forbidden, as managed Redis services do)."""
        d = self._send((b"CONFIG", b"GET", name))
        return d.addCallbacks(lambda r: r[1] if r and len(r) > 1 else None,
                              lambda f: None)

    def _conn(self):
        factory = self._factory
        if factory is None or not factory.pool:
            return None
        conn = factory.pool[0]
        return conn if conn.connected else None

    def _send(self, args):
        deadline = self.reactor.seconds() + self.timeout
        conn = self._conn()
        if conn is None:
            if self._factory is None:
                return defer.fail(StoreUnavailable("not connected"))
            d = defer.Deferred()
            self._waiting.append((deadline, args, d))
            return d
        d = conn.execute_command(*args)
        self._sent.append((deadline, d))
        return d

    def late_ms(self, key=None):
        """The store's clock time (ms, as bytes) after which a write sent now
        must not be done: a quarter of the deadline before this client gives
        up on it and tells the client "unavailable", so that the answer is
        true even when the store runs a command late (a frozen or overloaded
        store). b"0" (no check) until the store's clock has been read."""
        if self._offset is None:
            return b"0"
        return b"%d" % ((self.reactor.seconds() + self.timeout * 0.75) * 1000 + self._offset)

    def _read_clock(self):
        """Measure the store's clock against ours (and check it answers)."""
        sent = self.reactor.seconds()

        def got(reply):
            mid = (sent + self.reactor.seconds()) / 2
            self._offset = int(reply[0]) * 1000 + int(reply[1]) // 1000 - mid * 1000

        self._send((b"TIME",)).addCallbacks(got, lambda f: None)

    def _load_library(self):
        """Send ``FUNCTION LOAD REPLACE`` (pipelined: calls sent after it run
        after it)."""
        self._reloading = True

        def loaded(_):
            self._reloading = False

        def failed(f):
            self._reloading = False
            if not f.check(txredisapi.ResponseError):
                return  # the connection is gone: the next one loads it
            if f.getErrorMessage().startswith("OOM"):
                # functions are stored with the data: the library loaded
                # before is there, unless this chatd version is new
                self._warn_full()
                return
            self.log.error(
                "the store refused chatd's function library ({why}); chatd needs "
                "Redis >= 7.0 or Valkey (FUNCTION LOAD, FCALL)", why=f.getErrorMessage())

        self._send((b"FUNCTION", b"LOAD", b"REPLACE", self._library.source)).addCallbacks(
            loaded, failed)

    _full_logged = None

    def _warn_full(self):
        """Say that the store is full, once a minute at most (every refused
        write would be one line)."""
        now = self.reactor.seconds()
        if self._full_logged is None or now - self._full_logged >= 60:
            self._full_logged = now
            self.log.warn(
                "the store is out of memory (its maxmemory): messages and registers "
                "are refused with 'unavailable' until acks, expiry or a higher "
                "limit (--store-max-memory, or maxmemory on your Redis) make room")

    def _missing(self, failure):
        if failure.check(txredisapi.ResponseError) and \
                "function not found" in str(failure.value).lower():
            if not self._reloading:
                self.log.warn("chatd's function library is gone from the store "
                              "(FUNCTION FLUSH?); loading it again")
                self._load_library()
            raise StoreUnavailable("the store had lost chatd's functions; nothing was stored")
        return failure

    def _connected(self, conn=None):
        """A connection is ready: load the library, send what waited for it,
        and wake waiters. All pipelined on the one connection, so the library
        is there before any call runs."""
        if self.library:
            self._load_library()
        self._read_clock()
        waiting, self._waiting = self._waiting, collections.deque()
        for deadline, args, d in waiting:
            if not d.called:
                self._send(args).chainDeferred(d)
        ready, self._ready = self._ready, []
        for d in ready:
            d.callback(True)

    def _check_deadlines(self):
        """The watchdog: cut a connection whose oldest reply is overdue, and
        fail calls that waited too long for a connection (never sent)."""
        now = self.reactor.seconds()
        sent = self._sent
        while sent and sent[0][1].called:
            sent.popleft()
        if sent and sent[0][0] <= now and self._overdue is None:
            # its reply may be waiting to be read (a busy reactor runs timers
            # before reading): look again after one turn
            self._overdue = sent[0][1]
            self.reactor.callLater(0, self._confirm_overdue)
        self._fail_waiting(lambda deadline: deadline <= now,
                           "no connection to the store within %gs" % self.timeout)
        self._ticks += 1
        if self._ticks % 120 == 0 and self._conn() is not None:
            self._read_clock()  # clocks drift; this also checks the store answers

    def _confirm_overdue(self):
        overdue, self._overdue = self._overdue, None
        if overdue is None or overdue.called:
            return
        self.log.warn("the store has not answered for {t}s; reconnecting", t=self.timeout)
        self._sent.clear()
        conn = self._conn()
        if conn is not None:
            # txredisapi fails every call on it with ConnectionError
            conn.transport.abortConnection()

    def _reconnect(self, why):
        """Cut the connection (every call on it fails); txredisapi connects
        again, through the sentinels when there are some."""
        conn = self._conn()
        if conn is not None:
            self.log.warn(why + "; reconnecting", store=self.target.describe())
            conn.transport.abortConnection()

    def _fail_waiting(self, expired, why):
        waiting = self._waiting
        while waiting and expired(waiting[0][0]):
            _, _, d = waiting.popleft()
            if not d.called:
                d.errback(StoreUnavailable(why))

    def _timed(self, result, name, start):
        self.stats.observe(name, self.reactor.seconds() - start)
        return result

    def _unavailable(self, failure, what):
        if failure.check(txredisapi.ResponseError) and \
                failure.getErrorMessage().startswith(REDIRECTS):
            # not (yet) a failure: the cluster client retries it, and counts
            # it as unavailable only if it gives up
            raise Redirected(failure.getErrorMessage())
        self.stats.unavailable += 1
        if failure.check(StoreUnavailable):
            raise failure.type("%s: %s" % (_text(what), failure.value))
        reason = "%s: %s" % (failure.type.__name__, failure.getErrorMessage())
        if failure.check(txredisapi.ResponseError) and \
                failure.getErrorMessage().startswith("OOM"):
            self._warn_full()
            raise StoreFull("%s: the store is out of memory (maxmemory)" % _text(what))
        if failure.check(txredisapi.ResponseError) and \
                failure.getErrorMessage().startswith("READONLY"):
            # a primary turned replica (a failover): find the primary again
            self._reconnect("the store {store} is a replica now (READONLY)")
            raise StoreUnavailable("%s: the store is a replica now" % _text(what))
        if failure.check(txredisapi.ResponseError):
            # an error reply is a bug or a misconfigured store, not an outage
            self.log.error("store error on {what}: {reason}", what=_text(what), reason=reason)
        raise StoreUnavailable("%s: %s" % (_text(what), reason))


def tls_options(target, log=None):
    """The TLS client options of a ``rediss://`` target: the server's
    certificate must be valid for the target's host name (or IP address) and
    signed by a CA of ``target.tls_ca_file`` (else one the system trusts).
    Only ``tls_verify=False`` (``--redis-tls-insecure``) turns that off, and
    it is logged as critical: anyone on the path can then read and change
    every message."""
    from twisted.internet import ssl
    if not target.tls_verify:
        if log is not None:
            log.critical(
                "--redis-tls-insecure: the certificate of the store {store} is NOT "
                "checked; anyone on the network path can read and change every "
                "message and token. Use it for tests only.", store=target.describe())
        return ssl.CertificateOptions(verify=False)
    trust = None
    if target.tls_ca_file:
        trust = ssl.trustRootFromCertificates(config.load_certificates(target.tls_ca_file))
    return ssl.optionsForClientTLS(target.host, trustRoot=trust)


def _text(what):
    return what.decode("ascii", "replace") if isinstance(what, bytes) else what
