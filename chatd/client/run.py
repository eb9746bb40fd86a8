"""
One run of the terminal client, whatever its mode: the :class:`App` base
that owns the session, stdio and the exit status, and stops cleanly (acks
and stdout flushed) however the run ends. Everything runs on the Twisted
reactor, without threads: stdin is read through
:class:`twisted.internet.stdio.StandardIO` (its end is an event, so nothing
spins when input ends); each output line is written as it comes, before the
message it shows is acked.
"""

import os
import select

from twisted.internet import defer, error
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from chatd.client.connection import Session
from chatd.client.formatting import describe_reply, plural
from chatd.client.tokens import TokenFile, default_state_dir

#: how long closing the connection and stdio may take at exit
CLOSE_GRACE = 2.0


def write_line(fd, text, end="\n"):
    """Write a line to stdout or stderr now; True once it is all written.

    Output is written synchronously, not buffered in the reactor: a message
    is acked only after its line is out (a reader that went away must not
    cost messages), and a slow reader slows the client down rather than
    piling up memory. StandardIO makes the terminal's open file
    non-blocking, so a write may meet EAGAIN: wait for the terminal then. A
    closed stream (EPIPE) returns False, no traceback."""
    data = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
    data += end.encode()
    while data:
        try:
            data = data[os.write(fd, data):]
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
        except OSError:
            return False
    return True


def write_stderr(text):
    write_line(2, text)


class BlockingModes:
    """The O_NONBLOCK flags of stdin, stdout and stderr as they were at
    start, put back at exit: StandardIO sets them on the terminal's open
    file, which the shell shares, and programs run after us would meet
    EAGAIN."""

    def __init__(self):
        import fcntl
        self.fcntl = fcntl
        self.flags = {}
        for fd in (0, 1, 2):
            try:
                self.flags[fd] = fcntl.fcntl(fd, fcntl.F_GETFL)
            except OSError:
                pass

    def restore(self):
        for fd, flags in self.flags.items():
            try:
                self.fcntl.fcntl(fd, self.fcntl.F_SETFL, flags)
            except OSError:
                pass


@implementer(IHalfCloseableProtocol)
class InputLines(LineReceiver):
    """stdin as text lines (a last line without a newline counts); stdout
    stays writable after the end of input (half-close)."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, app):
        self.app = app
        self.output_lost = False
        self.closed = defer.Deferred()

    def lineReceived(self, line):
        self.app.line_typed(line.decode("utf-8", "replace").rstrip("\r"))

    def lineLengthExceeded(self, line):
        self.app.say("error", "a line over %d bytes was dropped" % self.MAX_LENGTH)

    def readConnectionLost(self):
        rest = self.clearLineBuffer()
        if rest.strip():
            self.lineReceived(rest)
        self.app.input_ended()

    def writeConnectionLost(self):
        self.output_lost = True
        self.app.output_closed()

    def connectionLost(self, reason):
        if not self.closed.called:
            self.closed.callback(None)


class App:
    """One run of the client: the session, stdio, the exit status, and a
    clean stop (acks flushed, stdout flushed) however the run ends: end of
    input, /quit, SIGINT/SIGTERM, or a fatal error."""

    uses_stdio = True

    def __init__(self, options, reactor, environ):
        self.options = options
        self.reactor = reactor
        self.environ = environ
        self.where = "%s:%d" % (options.host, options.port)
        self.session = None
        self.stdio = None
        self.input = None
        self.status = 0
        self.finishing = False
        self._timers = []

    def run(self):
        modes = BlockingModes()
        self.reactor.callWhenRunning(self.start)
        self.reactor.addSystemEventTrigger("before", "shutdown", self._shutting_down)
        try:
            self.reactor.run()
        finally:
            modes.restore()
        return self.status

    def start(self):
        if self.uses_stdio:
            from twisted.internet.stdio import StandardIO
            self.input = InputLines(self)
            self.stdio = StandardIO(self.input, reactor=self.reactor)
        self.begin()

    def begin(self):
        raise NotImplementedError

    def make_session(self, device, **kw):
        from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
        o = self.options
        endpoint = HostnameEndpoint(self.reactor, o.host, o.port, timeout=o.timeout)
        tokens = TokenFile(o.state_dir or default_state_dir(self.environ), o.host, o.port, device)
        kw.setdefault("receipts", not getattr(o, "no_receipts", False))
        self.session = Session(device, tokens, self, lambda p: connectProtocol(endpoint, p),
                               self.reactor, self.where, new_token=o.register,
                               push=getattr(o, "push", None), **kw)
        return self.session

    def later(self, seconds, f, *args):
        call = self.reactor.callLater(seconds, f, *args)
        self._timers.append(call)
        return call

    # -- output ---------------------------------------------------------------------

    def write_out(self, text, end="\n"):
        """A line on stdout; False (and the run ends) if stdout is closed."""
        if write_line(1, text, end):
            return True
        self.output_closed()
        return False

    def say(self, kind, text):
        """A status line (kind: info, ok, warn, error)."""
        write_stderr(text)

    # -- the session's ui -------------------------------------------------------------------

    def notice(self, text):
        self.say("info", text)

    def problem(self, text):
        self.say("error", text)

    def incoming(self, push, raw):
        """Show one message; False if it could not be (it is not acked)."""
        return True

    def receipt(self, push, raw):
        """A receipt (1.2) for messages sent from here; False if it could
        not be shown (it is not acked)."""
        return True

    def answered(self, entry, reply):
        kind, words = describe_reply(entry.receiver, reply)
        self.say(kind, words)

    def fatal(self, status, text):
        self.say("error", text)
        self.finish(status)

    # -- input ------------------------------------------------------------------------------

    def line_typed(self, line):
        pass

    def input_ended(self):
        self.finish(0)

    def output_closed(self):
        self.finish(1)

    # -- the end --------------------------------------------------------------------------------

    def finish_when_sent(self, status=0):
        """Exit once every queued message is answered, waiting at most --timeout."""
        session = self.session
        if session is None or not session.outbox:
            return self.finish(status)
        waiting = len(session.outbox)
        if session.ready:
            self.notice("waiting for the answer to %s" % plural(waiting, "message"))
        d = session.when_idle()
        d.addTimeout(self.options.timeout, self.reactor)

        def gave_up(f):
            f.trap(defer.TimeoutError)
            left = len(session.outbox)
            self.say("error", "gave up: %s not sent (no answer from %s within %g s)"
                     % (plural(left, "message"), self.where, self.options.timeout))
            return 1

        d.addCallbacks(lambda _: status, gave_up)
        d.addCallback(self.finish)

    def finish(self, status):
        if self.finishing:
            return
        self.finishing = True
        self.status = status
        self._close().addBoth(lambda _: self._stop_reactor())

    def _shutting_down(self):
        # SIGINT/SIGTERM (the reactor is stopping): close as cleanly as finish()
        if self.finishing:
            return None
        self.finishing = True
        return self._close()

    @defer.inlineCallbacks
    def _close(self):
        for call in self._timers:
            if call.active():
                call.cancel()
        if self.session is not None:
            yield _within(self.session.stop(), CLOSE_GRACE, self.reactor)
        if self.stdio is not None and not self.input.closed.called:
            if self.input.output_lost:  # nothing to flush: close stdin too
                self.stdio.connectionLost(Failure(error.ConnectionDone()))
            else:
                self.stdio.loseConnection()  # flushes stdout first
            yield _within(self.input.closed, CLOSE_GRACE, self.reactor)

    def _stop_reactor(self):
        if self.reactor.running:
            self.reactor.stop()


def _within(d, seconds, reactor):
    """Wait for d, at most ``seconds``; never fails."""
    d.addTimeout(seconds, reactor)
    return d.addErrback(lambda f: None)
