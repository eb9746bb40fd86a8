"""
The embedded store's data directory (``--data-dir``): what must hold before
a valkey-server may run in it, and what a killed chatd left behind there.

The data directory is owned by one chatd at a time (an ``flock`` on
``chatd.lock``), because two valkey-servers appending to one AOF would
corrupt it. It must be this user's alone: it holds every message and token
hash. A chatd killed with SIGKILL leaves its valkey-server running
(orphaned, still holding the AOF); the next chatd on the same directory stops
that orphan gracefully (SIGTERM, so it flushes its AOF) before starting its
own. ``valkey.conf`` is written afresh at each start.
"""

import errno
import fcntl
import os
import re
import signal
import stat
import sys
import tempfile

from twisted.logger import Logger

log = Logger(namespace="chatd.store")

#: Longest unix socket path the kernel accepts (sun_path minus its NUL).
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107

POLL = 0.05  # readiness and orphan polling period (s)
_ORPHAN_KILL_WAIT = 5.0  # how long a SIGKILLed orphan may take to vanish (s)


class EmbeddedStoreError(Exception):
    """
    The embedded store cannot be started or run. The message is meant for the
    operator: it says what is wrong and, where possible, what to do.
    """



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


class DataDir:
    """
    The files of one embedded store in ``data_dir``: ``valkey.sock``,
    ``valkey.conf``, ``valkey.pid`` and ``chatd.lock``, whose ``flock`` says
    which chatd owns the directory (:meth:`lock` to :meth:`release`).
    """

    def __init__(self, data_dir):
        self.path = os.path.abspath(os.fspath(data_dir))
        self.socket_path = os.path.join(self.path, "valkey.sock")
        self.config_path = os.path.join(self.path, "valkey.conf")
        self.pid_path = os.path.join(self.path, "valkey.pid")
        self.lock_path = os.path.join(self.path, "chatd.lock")
        self._lockFd = None

    @property
    def locked(self):
        """Whether this process holds the directory (:meth:`lock` succeeded)."""
        return self._lockFd is not None

    # -- ownership -----------------------------------------------------------

    def checkSocketPath(self):
        if len(os.fsencode(self.socket_path)) > MAX_SOCKET_PATH:
            raise EmbeddedStoreError(
                "data dir %s is too deep: its socket path %s is longer than the "
                "%d bytes a unix socket allows; use a shorter --data-dir"
                % (self.path, self.socket_path, MAX_SOCKET_PATH))

    def lock(self):
        """
        Create the directory (0700), check that it is private, and hold an
        exclusive ``flock`` on ``chatd.lock`` for the life of this process
        (or until :meth:`release`).

        The lock fd is close-on-exec, so valkey-server never inherits it: an
        orphaned valkey-server must not keep the next chatd out, since that
        chatd is the one that cleans it up.
        """
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            self._checkPrivate()
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                         | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise EmbeddedStoreError(
                "cannot use data dir %s: %s" % (self.path, e.strerror)) from None
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
                    "use another --data-dir" % (self.path, holder)) from None
            raise EmbeddedStoreError(
                "cannot lock %s: %s" % (self.lock_path, e.strerror)) from None
        self._lockFd = fd
        self.writeLockPid()

    def _checkPrivate(self):
        """The data dir holds every message and token hash (the AOF) and the
        store's config: it must be this user's alone. A dir that others can
        read could leak them; one that others can write lets them swap
        ``valkey.conf`` or the socket. Refused, not fixed: who made it so
        may have meant it, and must decide."""
        st = os.stat(self.path)
        if not stat.S_ISDIR(st.st_mode):
            raise EmbeddedStoreError("data dir %s is not a directory" % self.path)
        if st.st_uid != os.geteuid():
            raise EmbeddedStoreError(
                "data dir %s belongs to uid %d, not to this user (uid %d); it holds "
                "every message: use a directory of your own (chown it, or another "
                "--data-dir)" % (self.path, st.st_uid, os.geteuid()))
        if st.st_mode & 0o077:
            raise EmbeddedStoreError(
                "data dir %s can be used by other users (mode %04o); it holds every "
                "message and token hash: chmod 700 %s" % (
                    self.path, stat.S_IMODE(st.st_mode), self.path))

    def writeLockPid(self):
        # Again at startService: twistd daemonizes (forks) after makeService,
        # and the lock, shared by the fork, then belongs to another pid.
        os.ftruncate(self._lockFd, 0)
        os.pwrite(self._lockFd, b"%d\n" % os.getpid(), 0)

    def release(self):
        """Give the directory up (close the lock)."""
        fd, self._lockFd = self._lockFd, None
        if fd is not None:
            os.close(fd)

    # -- valkey.conf ---------------------------------------------------------

    def writeConfig(self, max_memory):
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
            ("dir", _quote(self.path)),
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
            ("maxmemory", "%d" % max_memory),
            ("maxmemory-policy", "noeviction"),
        ]
        text = ("# Written by chatd at each start of its embedded store; "
                "edits are lost.\n"
                + "".join("%s %s\n" % kv for kv in settings))
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=".valkey.conf.", dir=self.path)
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
            cwd, ours = os.stat("/proc/%d/cwd" % pid), os.stat(self.path)
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

    async def reapOrphans(self, clock, sleep, stop_grace):
        """
        Stop a valkey-server left running on this data dir by a chatd that
        was killed (we hold the lock, so no live chatd owns it), then remove
        its stale socket and pid file. The data files are kept: the orphan
        flushes its AOF on SIGTERM, and the new child loads it.

        ``clock`` tells the time; ``sleep(seconds)`` is the caller's
        cancellable pause (a stop cancels the wait).
        """
        orphans = self._findOrphans()
        for pid in orphans:
            log.warn("stopping valkey-server pid {pid}, left running on {dir} by "
                     "an earlier chatd", pid=pid, dir=self.path)
            self._signalOrphan(pid, signal.SIGTERM)
        await self._waitOrphans(orphans, stop_grace, clock, sleep)
        orphans = [pid for pid in orphans if self._isOurServer(pid)]
        for pid in orphans:
            log.warn("valkey-server pid {pid} did not stop within {grace:g} s; "
                     "killing it", pid=pid, grace=stop_grace)
            self._signalOrphan(pid, signal.SIGKILL)
        await self._waitOrphans(orphans, _ORPHAN_KILL_WAIT, clock, sleep)
        stuck = [pid for pid in orphans if self._isOurServer(pid)]
        if stuck:
            raise EmbeddedStoreError(
                "valkey-server pid %d still runs on %s after SIGKILL; kill it "
                "by hand" % (stuck[0], self.path))
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

    async def _waitOrphans(self, pids, timeout, clock, sleep):
        deadline = clock.seconds() + timeout
        while (any(self._isOurServer(pid) for pid in pids)
               and clock.seconds() < deadline):
            await sleep(POLL)
