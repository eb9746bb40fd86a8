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

chatd's Lua (handed in as a library: :class:`chatd.store.library.Library`)
runs as one Valkey/Redis *function library* (``FUNCTION LOAD``, ``FCALL``;
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

from twisted.internet import defer, task
from twisted.logger import Logger

from chatd.errors import StoreFull, StoreUnavailable
from chatd.redis import adapter
from chatd.redis.acks import StoreAcks
from chatd.redis.stats import StoreStats


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


class RedisClient:
    """A txredisapi connection with deadlines on every call."""

    #: one store: a Lua step may touch any key (see chatd.store.receipts)
    sharded = False

    log = Logger()

    def __init__(self, target, timeout, reactor, library=None, acks=0):
        self.target = target
        self.timeout = timeout
        self.reactor = reactor
        # the function library (chatd.store.library.Library) loaded on every
        # connection; None: a connection that only reads (a cluster seed
        # asked for the topology, which may be a replica)
        self.library = library
        self.stats = StoreStats()  # read by chatd.ops.metrics
        # --store-acks: replicas that must confirm a write (group commit)
        self.acks = StoreAcks(self._send, timeout, acks, self.stats) if acks else None
        self._reloading = False
        self._factory = None
        self._sent = collections.deque()     # (deadline, Deferred) in send order
        self._waiting = collections.deque()  # (deadline, args, Deferred) until connected
        self._watchdog = None
        self._ticks = 0
        self._overdue = None  # the call found overdue, awaiting confirmation
        self._offset = None   # the store's clock minus ours, in ms
        self._ready = []

    # -- lifecycle ---------------------------------------------------------------

    def connect(self):
        self._factory = adapter.start_factory(adapter.ConnectionFactory, self.target, self.timeout,
                                      self.reactor, owner=self)
        self._watchdog = task.LoopingCall(self._check_deadlines)
        self._watchdog.clock = self.reactor
        self._watchdog.start(min(self.timeout / 4, 0.25), now=False)
        return self

    def when_connected(self, timeout):
        """Deferred that fires once connected, or after ``timeout`` regardless
        (with False), so that a node can start while its store is down."""
        if self.connected:
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
        return adapter.stop_factory(factory)

    # -- calls -------------------------------------------------------------------

    def call(self, *args):
        """Run one command; Deferred of its reply (bytes, int, list, None)."""
        d = self._send(args).addBoth(self._timed, args[0], self.reactor.seconds())
        return d.addErrback(self._unavailable, args[0])

    def script(self, name, keys, args):
        """Run ``chatd/store/lua/<name>.lua`` (a function of chatd's library);
        Deferred of its reply.

        The library is on the store before any call (see :meth:`_connected`).
        A call that finds it gone (an operator's ``FUNCTION FLUSH``) fails as
        ``unavailable`` and has the library loaded again; it is never run a
        second time behind calls sent after it, which is what would reorder
        one connection's messages."""
        d = self._send((b"FCALL", self.library.functions[name], len(keys), *keys, *args))
        if self.acks is not None:
            d = self.acks.confirmed(d)
        d.addBoth(self._timed, name, self.reactor.seconds())
        d.addErrback(self._missing)
        return d.addErrback(self._unavailable, name)

    def config_get(self, name):
        """Deferred of a store setting (bytes), or None when the store will not
        say (CONFIG renamed or forbidden, as managed Redis services do)."""
        d = self._send((b"CONFIG", b"GET", name))
        return d.addCallbacks(lambda r: r[1] if r and len(r) > 1 else None,
                              lambda f: None)

    def split(self, items, key):
        """``items`` in groups that one call may take together: one group
        on a single store (see :meth:`chatd.redis.cluster.ClusterClient.split`)."""
        return [items]

    @property
    def connected(self):
        """Whether a connection is ready now."""
        return adapter.connection(self._factory) is not None

    def _conn(self):
        return adapter.connection(self._factory)

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
            if not f.check(adapter.ErrorReply):
                return  # the connection is gone: the next one loads it
            if f.getErrorMessage().startswith("OOM"):
                # functions are stored with the data: the library loaded
                # before is there, unless this chatd version is new
                self._warn_full()
                return
            self.log.error(
                "the store refused chatd's function library ({why}); chatd needs "
                "Redis >= 7.0 or Valkey (FUNCTION LOAD, FCALL)", why=f.getErrorMessage())

        self._send((b"FUNCTION", b"LOAD", b"REPLACE", self.library.source)).addCallbacks(
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
        if failure.check(adapter.ErrorReply) and \
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
        if self.library is not None:
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
        if self._ticks % 120 == 0 and self.connected:
            self._read_clock()  # clocks drift; this also checks the store answers

    def _confirm_overdue(self):
        overdue, self._overdue = self._overdue, None
        if overdue is None or overdue.called:
            return
        self.log.warn("the store has not answered for {t}s; reconnecting", t=self.timeout)
        self._sent.clear()
        conn = self._conn()
        if conn is not None:
            adapter.cut(conn)  # every call on it fails

    def _reconnect(self, why):
        """Cut the connection (every call on it fails); txredisapi connects
        again, through the sentinels when there are some."""
        conn = self._conn()
        if conn is not None:
            self.log.warn(why + "; reconnecting", store=self.target.describe())
            adapter.cut(conn)

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
        if failure.check(adapter.ErrorReply) and \
                failure.getErrorMessage().startswith(REDIRECTS):
            # not (yet) a failure: the cluster client retries it, and counts
            # it as unavailable only if it gives up
            raise Redirected(failure.getErrorMessage())
        self.stats.unavailable += 1
        if failure.check(StoreUnavailable):
            raise failure.type("%s: %s" % (_text(what), failure.value))
        reason = "%s: %s" % (failure.type.__name__, failure.getErrorMessage())
        if failure.check(adapter.ErrorReply) and \
                failure.getErrorMessage().startswith("OOM"):
            self._warn_full()
            raise StoreFull("%s: the store is out of memory (maxmemory)" % _text(what))
        if failure.check(adapter.ErrorReply) and \
                failure.getErrorMessage().startswith("READONLY"):
            # a primary turned replica (a failover): find the primary again
            self._reconnect("the store {store} is a replica now (READONLY)")
            raise StoreUnavailable("%s: the store is a replica now" % _text(what))
        if failure.check(adapter.ErrorReply):
            # an error reply is a bug or a misconfigured store, not an outage
            self.log.error("store error on {what}: {reason}", what=_text(what), reason=reason)
        raise StoreUnavailable("%s: %s" % (_text(what), reason))


def _text(what):
    return what.decode("ascii", "replace") if isinstance(what, bytes) else what
