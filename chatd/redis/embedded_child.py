"""
One run of the embedded store's valkey-server as a child process
(:class:`Child`: its output to the log, its exit, signals) and the PING
probe that tells when it is ready (:class:`Ping`).
"""

import collections
import re
import signal

from twisted.internet import defer, error, protocol
from twisted.logger import Logger, LogLevel

log = Logger(namespace="chatd.store")

_TAIL = 10  # lines of child output kept for error messages

# "3143:M 29 Nov 2026 16:28:44.058 * Ready to accept connections unix"
_LOG_LINE = re.compile(
    r"^\d+:[A-Z] \d{1,2} \w{3} \d{4} \d{2}:\d{2}:\d{2}\.\d{3} ([.*#-]) (.*)$")
_LOG_LEVELS = {
    ".": LogLevel.debug, "-": LogLevel.debug,
    "*": LogLevel.info, "#": LogLevel.warn,
}


class Child(protocol.ProcessProtocol):
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


class PingFactory(protocol.Factory):
    """Builds probes; not noisy, or each probe would log two lines."""

    noisy = False

    def __init__(self, reactor, timeout):
        self.reactor = reactor
        self.timeout = timeout

    def buildProtocol(self, addr):
        return Ping(self.reactor, self.timeout)


class Ping(protocol.Protocol):
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
