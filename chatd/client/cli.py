"""
The terminal client: chat with a chatd server from a shell, a script or a
pipe, the way a person testing the server wants to (``chatd-client HOST PORT``).

It is a small device of its own: it registers once and keeps its token
between runs, reconnects by itself with back-off when the connection drops,
resends what was not answered (each send has a ``ref``, so a resend never
stores a message twice), shows each incoming message once (a device drops
server ids it has already shown) and acks what it has shown.

The module reads top to bottom as: what is shown (pure formatting), what is
typed (command parsing), where the token lives, the conversation with the
server across connections (:class:`Session`, no terminal in it), and the
three ways to run it (interactive, ``--listen``, ``--send``). Everything runs
on the Twisted reactor, without threads: stdin is read through
:class:`twisted.internet.stdio.StandardIO` (its end is an event, so nothing
spins when input ends); each output line is written as it comes, before the
message it shows is acked.
"""

import argparse
import json
import os
import secrets
import select
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional
from urllib.parse import quote

from twisted.internet import defer, error
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from chatd.wire.packets import ID_RE

#: the first wait before reconnecting; it doubles after each failure ...
BACKOFF_FIRST = 0.5
#: ... up to this
BACKOFF_MAX = 10.0
#: sends written but not answered yet, at most; the rest wait their turn (a
#: pasted file must not run into the server's rate limit all at once)
SEND_WINDOW = 32
#: how long to wait before resending a message the server refused as rate_limited
RATE_RETRY = 1.0
#: how long closing the connection and stdio may take at exit
CLOSE_GRACE = 2.0
#: errors after which the server closes the connection (we reconnect, except
#: after session_replaced: another client of the same id took over)
CLOSING_CODES = ("session_replaced", "shutdown", "idle_timeout", "auth_timeout",
                 "slow_consumer", "line_too_long")

HELP = """\
commands:
  /to ID         talk to ID: each plain line is then sent to ID
  /to ID TEXT    talk to ID and send TEXT
  /help          this help
  /quit          leave (Ctrl-D, the end of input, does the same)
  //TEXT         send a line that starts with "/"
incoming messages show as [time] sender: text"""


# -- what is shown ---------------------------------------------------------------

class Style:
    """How text is painted: ANSI colours on a terminal, plain text elsewhere."""

    COLOURS = {"time": "2", "sender": "1;36", "ok": "32", "warn": "33",
               "error": "31", "info": "2"}

    def __init__(self, colour):
        self.colour = colour

    @classmethod
    def for_stream(cls, stream, environ):
        """Colour only on a terminal, and never when NO_COLOR is set (no-color.org)."""
        try:
            tty = stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        return cls(tty and not environ.get("NO_COLOR"))

    def paint(self, kind, text):
        if not self.colour or kind not in self.COLOURS:
            return text
        return "\x1b[%sm%s\x1b[0m" % (self.COLOURS[kind], text)


PLAIN = Style(False)


def clean_text(text):
    """A message's text made safe for a terminal: another person wrote it, so
    control characters (escape sequences could rewrite the screen) are shown
    as ``\\x1b``-style escapes; tabs become spaces; newlines are kept."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append(ch)
        elif ch == "\t":
            out.append("    ")
        elif ord(ch) < 32 or 127 <= ord(ch) < 160:
            out.append("\\x%02x" % ord(ch))
        else:
            out.append(ch)
    return "".join(out)


def clock_time(sent_at_ms, now=None):
    """Local time of a ``sent_at`` (ms since the epoch): ``hh:mm:ss`` today,
    with the date in front for an older message (offline catch-up)."""
    try:
        when = time.localtime(sent_at_ms / 1000.0)
    except (TypeError, ValueError, OverflowError, OSError):
        when = time.localtime(now)
    today = time.localtime(now)
    if when[:3] == today[:3]:
        return time.strftime("%H:%M:%S", when)
    return time.strftime("%Y-%m-%d %H:%M:%S", when)


def format_push(push, style=PLAIN, now=None):
    """One incoming message as ``[hh:mm:ss] sender: text`` (continuation lines
    of a multi-line text indented under the text)."""
    stamp = "[%s]" % clock_time(push.get("sent_at"), now)
    sender = clean_text(str(push.get("sender", "?")))
    head = "%s %s: " % (stamp, sender)
    text = clean_text(str(push.get("message", ""))).replace("\n", "\n" + " " * len(head))
    return "%s %s %s" % (style.paint("time", stamp), style.paint("sender", sender + ":"), text)


def describe_error(reply):
    """An error reply in words: ``<reason> (<code>)``."""
    code = reply.get("code") or "error"
    reason = reply.get("reason") or code.replace("_", " ")
    return "%s (%s)" % (clean_text(str(reason)), code)


def describe_reply(receiver, reply):
    """The server's answer to one send, as ``(kind, words)``; kind is ``ok``,
    ``warn`` or ``error`` (how it is painted, and the exit status of --send)."""
    kind = reply.get("type")
    if kind == "accepted":
        return "ok", "sent to %s" % receiver
    if kind == "duplicate":
        return "warn", "not sent: %s got the same text moments ago (duplicate)" % receiver
    return "error", "error: %s" % describe_error(reply)


def id_order(server_id):
    """A sort key for server ids: chatd's are zero-padded decimals, but the
    contract only promises increasing strings, so compare length first."""
    return (len(server_id), server_id)


def failure_words(value):
    """Why a connection attempt failed, in a few words."""
    if isinstance(value, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(value, error.DNSLookupError):
        return "no such host"
    if isinstance(value, (error.TimeoutError, error.TCPTimedOutError, defer.CancelledError)):
        return "timed out"
    if isinstance(value, error.NoRouteError):
        return "no route to host"
    if isinstance(value, error.ConnectError) and value.osError:
        return os.strerror(value.osError) if isinstance(value.osError, int) else str(value.osError)
    return str(value) or value.__class__.__name__


# -- what is typed -----------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    """One line of input. ``kind`` is ``send`` (``text`` to the peer), ``to``
    (``peer``, maybe with ``text`` to send), ``help``, ``quit``, ``nothing``
    (an empty line) or ``bad`` (``text`` says why)."""

    kind: str
    peer: Optional[str] = None
    text: Optional[str] = None


def parse_command(line):
    """A typed line -> :class:`Command`."""
    if not line.strip():
        return Command("nothing")
    if line.startswith("//"):
        return Command("send", text=line[1:])
    if not line.startswith("/"):
        return Command("send", text=line)
    name, _, rest = line[1:].partition(" ")
    name = name.strip().lower()
    if name == "to":
        peer, _, text = rest.strip().partition(" ")
        if not peer:
            return Command("bad", text="/to needs an id: /to ID")
        if not ID_RE.match(peer):
            return Command("bad", text="not a valid id: %r (1-64 characters from "
                                       "A-Z a-z 0-9 _ . : @ + -)" % peer)
        return Command("to", peer=peer, text=text or None)
    if name in ("help", "?"):
        return Command("help")
    if name in ("quit", "exit", "q"):
        return Command("quit")
    return Command("bad", text="unknown command /%s; /help lists them" % name)


# -- where the token lives -----------------------------------------------------------

def default_state_dir(environ):
    """``$XDG_STATE_HOME/chatd-client`` (an absolute XDG_STATE_HOME only, as
    the XDG spec says), else ``~/.local/state/chatd-client``."""
    base = environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "chatd-client")


class TokenFile:
    """The token of one id at one server, kept between runs: one small JSON
    file per host, port and id, readable by its owner only (0600, in a 0700
    directory), since the token is all it takes to read that id's messages."""

    def __init__(self, directory, host, port, device):
        self.directory = directory
        self.server = "%s:%d" % (host, port)
        self.device = device
        # the host quoted so that it holds no "_": "host_port_id" splits one way only
        self.path = os.path.join(directory, "%s_%d_%s.json" % (
            quote(host, safe=".-"), port, device))

    def load(self):
        """The saved token, or None (never saved, unreadable, or not ours)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or saved.get("id") != self.device:
            return None
        token = saved.get("token")
        return token if isinstance(token, str) and token else None

    def save(self, token):
        """Write the token atomically (a crash leaves the old file or the new
        one, never half of one). Raises OSError."""
        if not os.path.isdir(self.directory):
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            os.chmod(self.directory, 0o700)
        data = json.dumps({"server": self.server, "id": self.device, "token": token})
        tmp = "%s.%d.tmp" % (self.path, os.getpid())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)


# -- the conversation with the server --------------------------------------------------

@dataclass
class Outgoing:
    """One message typed and not answered yet. ``sent``: written on the
    current connection (a new connection sends it again, same ``ref``)."""

    ref: str
    receiver: str
    text: str
    sent: bool = False


class ServerConnection(LineReceiver):
    """One TCP connection to chatd: lines in as dicts, packets out as lines.
    Everything it hears goes to its :class:`Session`."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 24

    def __init__(self, session):
        self.session = session

    def connectionMade(self):
        try:
            self.transport.setTcpKeepAlive(True)
        except (AttributeError, NotImplementedError, OSError):
            pass
        self.session.connection_made(self)

    def send(self, packet):
        self.transport.write(json.dumps(packet, separators=(",", ":")).encode() + b"\n")

    def dataReceived(self, data):
        super().dataReceived(data)
        # every line of this read is handled: one cumulative ack covers them
        self.session.batch_done(self)

    def lineReceived(self, line):
        line = line.rstrip(b"\r")
        if not line.strip():
            return
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            self.session.ui.problem("the server sent a line that is not a JSON object: %r"
                                    % line[:80])
            return
        self.session.received(self, reply, line)

    def lineLengthExceeded(self, line):
        self.session.ui.problem("the server sent a line over %d bytes; dropping the "
                                "connection" % self.MAX_LENGTH)
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self.session.connection_lost(self, reason)


class Session:
    """One device's conversation with a server, across connections.

    It binds each new connection (``reconnect`` with the saved token, else
    ``register``, and ``register`` again if the token is refused), resends
    every unanswered message with its ``ref`` once bound, shows each pushed
    message once (ids at or below the highest shown are dropped) and acks
    after each read, and reconnects with back-off when the connection drops.

    What happens is told to ``ui`` (``notice``, ``problem``, ``incoming``,
    ``answered``, ``fatal``). ``connect(protocol)`` opens a connection (a
    Deferred); ``clock`` schedules. Neither is a terminal or a socket here, so
    the whole state machine can be tested with a fake transport.

    ``one_shot`` (``--send``): with a saved token, messages go out as one-shot
    sends (sender + token) on an unbound connection, so a client of the same
    id running elsewhere is not replaced; pushes are neither shown nor acked.
    ``retry_first`` False: give up (``fatal`` 2) if the very first connection
    attempt fails.
    """

    def __init__(self, device, tokens, ui, connect, clock, where, *,
                 new_token=False, one_shot=False, retry_first=True):
        self.device = device
        self.tokens = tokens
        self.ui = ui
        self._connect = connect
        self.clock = clock
        self.where = where
        self.one_shot = one_shot
        self.retry_first = retry_first
        self.token = None if new_token else tokens.load()
        self.outbox = OrderedDict()  # ref -> Outgoing, in the order typed
        self.conn = None             # the current ServerConnection
        self.binding = False         # a register/reconnect is unanswered
        self.ready = False           # messages may be sent on this connection
        self.shown = None            # id_order() of the highest id shown
        self.delay = BACKOFF_FIRST
        self.ever_connected = False
        self.failed_dials = 0        # since the last connection was made
        self.stopped = False
        self._run = secrets.token_hex(4)  # refs must not repeat across runs
        self._sends = 0
        self._dialing = None
        self._retry = None
        self._pump_later = None
        self._why_closed = None  # what to say when this connection closes
        self._cannot_show = False  # the ui could not show a message: stop acking
        self._idle = []
        self._gone = []

    # -- what the application asks --------------------------------------------------

    def start(self):
        self._dial()

    def send(self, receiver, text):
        """Queue a message; it goes out now if bound, else once bound."""
        self._sends += 1
        entry = Outgoing("c-%s-%d" % (self._run, self._sends), receiver, text)
        self.outbox[entry.ref] = entry
        self._pump()
        return entry

    def when_idle(self):
        """Deferred that fires once every queued message is answered."""
        if not self.outbox:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle.append(d)
        return d

    def stop(self):
        """Stop for good: no more reconnects; close the connection (letting
        the acks already written reach the server). Deferred: closed."""
        self.stopped = True
        for call in (self._retry, self._pump_later):
            if call is not None and call.active():
                call.cancel()
        self._retry = self._pump_later = None
        if self._dialing is not None:
            self._dialing.cancel()
        if self.conn is None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._gone.append(d)
        self.conn.transport.loseConnection()
        return d

    @property
    def offline(self):
        """Not connected, and not merely making the first connection either:
        the connection was lost or could not be made."""
        return self.conn is None and (self.ever_connected or self.failed_dials > 0)

    # -- connections ---------------------------------------------------------------------

    def _dial(self):
        self._retry = None
        if self.stopped:
            return
        d = self._dialing = self._connect(ServerConnection(self))

        def failed(f):
            self._dialing = None
            if self.stopped:
                return
            self.failed_dials += 1
            words = "cannot connect to %s: %s" % (self.where, failure_words(f.value))
            if not self.ever_connected and not self.retry_first:
                self.ui.fatal(2, words)
            else:
                self._reconnect_later(words, "retrying")

        def done(result):
            self._dialing = None

        d.addCallbacks(done, failed)

    def _reconnect_later(self, why, verb):
        delay, self.delay = self.delay, min(self.delay * 2, BACKOFF_MAX)
        self.ui.notice("%s; %s in %.1f s" % (why, verb, delay))
        self._retry = self.clock.callLater(delay, self._dial)

    def connection_made(self, conn):
        if self.stopped:
            conn.transport.abortConnection()
            return
        self.ever_connected = True
        self.failed_dials = 0
        self.conn = conn
        self._why_closed = None
        self.pushed_here = None  # the last id pushed on this connection
        self.acked_here = None   # the last id acked on it
        if self.token and self.one_shot:
            self._ready()
        else:
            self._bind()

    def _bind(self):
        self.binding = True
        if self.token:
            self.conn.send({"reconnect": "true", "sender": self.device, "token": self.token})
        else:
            self.conn.send({"register": "true", "sender": self.device})

    def _ready(self):
        self.ready = True
        self.delay = BACKOFF_FIRST
        self._pump()

    def connection_lost(self, conn, reason):
        if conn is not self.conn:
            return
        self.conn = None
        self.binding = self.ready = False
        for entry in self.outbox.values():
            entry.sent = False
        if self._pump_later is not None and self._pump_later.active():
            self._pump_later.cancel()
        self._pump_later = None
        gone, self._gone = self._gone, []
        for d in gone:
            d.callback(None)
        if self.stopped:
            return
        self._reconnect_later(self._why_closed or "connection lost", "reconnecting")

    # -- what the server says ---------------------------------------------------------------

    def received(self, conn, reply, raw):
        if conn is not self.conn:
            return
        kind = reply.get("type")
        if kind == "message":
            self._pushed(reply, raw)
        elif kind == "ping":
            conn.send({"ping": "keepalive"})  # the server's liveness check
        elif kind == "registered":
            self._registered(reply)
        elif kind == "reconnected":
            self.binding = False
            pending = reply.get("pending")
            self.ui.notice("connected to %s as %s%s" % (
                self.where, self.device,
                "; %s waiting" % _count(pending, "message") if pending else ""))
            self._ready()
        elif kind in ("accepted", "duplicate"):
            self._answered(reply)
        elif kind == "error":
            self._error(reply)
        # pong, and types a newer server may add: nothing to do

    def _registered(self, reply):
        self.binding = False
        token = reply.get("token")
        self.token = token
        # a new registration may be on a new store whose ids start again at
        # 1: showing a message twice is better than hiding one
        self.shown = None
        try:
            self.tokens.save(token)
            where = "token saved in %s" % self.tokens.path
        except OSError as e:
            where = "could not save the token in %s: %s" % (self.tokens.path, e.strerror or e)
        self.ui.notice("registered as %s at %s; %s" % (self.device, self.where, where))
        self._ready()

    def _error(self, reply):
        code = reply.get("code")
        entry = self.outbox.get(reply.get("ref")) if isinstance(reply.get("ref"), str) else None
        if entry is not None:
            if code == "bad_token":
                entry.sent = False
                self._token_refused()
            elif code == "rate_limited":
                # the server says so once, then drops what follows in silence:
                # this one and every send written after it go again (same
                # ref: one that was accepted after all is answered so again)
                later = False
                for other in self.outbox.values():
                    later = later or other is entry
                    if later:
                        other.sent = False
                self._pause_sending()
            else:
                self._answered(reply)
            return
        if code == "session_replaced":
            self.ui.fatal(1, "%s connected from somewhere else; this client stops (%s)"
                          % (self.device, code))
            return
        if code in CLOSING_CODES:
            # said when the connection closes, with when we try again
            self._why_closed = "the server closed the connection: %s" % describe_error(reply)
            return
        if self.binding:
            if code == "bad_token":
                self._token_refused()
            elif code in ("unavailable", "rate_limited"):
                # try again on a new connection, after the back-off
                self._why_closed = "cannot %s as %s: %s" % (
                    "reconnect" if self.token else "register", self.device,
                    describe_error(reply))
                self.conn.transport.loseConnection()
            else:
                self.ui.fatal(2, "cannot %s as %s: %s" % (
                    "reconnect" if self.token else "register", self.device,
                    describe_error(reply)))
            return
        self.ui.problem("error: %s" % describe_error(reply))

    def _token_refused(self):
        """The saved token is no longer valid (another register revoked it, or
        the store is new): register again, once, and say so."""
        if self.binding and not self.token:
            return  # already registering
        self.token = None
        self.ready = False
        self.ui.notice("the saved token of %s was refused (bad_token); registering again"
                       % self.device)
        self._bind()

    def _pushed(self, push, raw):
        server_id = push.get("id")
        if not isinstance(server_id, str) or not self.ready or self.one_shot \
                or self._cannot_show:
            return  # --send shows nothing and acks nothing: it all stays stored
        key = id_order(server_id)
        if self.shown is not None and key <= self.shown:
            self.pushed_here = server_id
            return  # shown before this connection; acked below all the same
        if self.ui.incoming(push, raw) is False:
            self._cannot_show = True  # it, and what follows, stay stored
            return
        self.shown = key
        self.pushed_here = server_id

    def batch_done(self, conn):
        """After each read: ack the last id pushed here (cumulative)."""
        if conn is self.conn and self.pushed_here is not None \
                and self.pushed_here != self.acked_here:
            self.acked_here = self.pushed_here
            conn.send({"ack": self.pushed_here})

    def _answered(self, reply):
        entry = self.outbox.pop(reply.get("ref"), None) if isinstance(reply.get("ref"), str) else None
        if entry is None:
            return  # not a reply to one of ours (cannot happen with chatd)
        self.ui.answered(entry, reply)
        self._pump()
        if not self.outbox:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    # -- sending ---------------------------------------------------------------------------

    def _pump(self):
        """Write queued messages, oldest first, keeping SEND_WINDOW in flight."""
        if not self.ready or self.conn is None or self._pump_later is not None:
            return
        in_flight = sum(1 for e in self.outbox.values() if e.sent)
        for entry in self.outbox.values():
            if in_flight >= SEND_WINDOW:
                break
            if entry.sent:
                continue
            packet = {"message": entry.text, "receiver": entry.receiver, "ref": entry.ref}
            if self.one_shot and not self.binding and self.token:
                packet.update(sender=self.device, token=self.token)
            self.conn.send(packet)
            entry.sent = True
            in_flight += 1

    def _pause_sending(self):
        """The server dropped a send as rate_limited: nothing was done with it,
        so it is sent again (same ref) a little later."""
        if self._pump_later is None:
            def resume():
                self._pump_later = None
                self._pump()
            self._pump_later = self.clock.callLater(RATE_RETRY, resume)


def _count(n, word):
    return "%s %s%s" % (n, word, "" if n == 1 else "s")


# -- the ways to run it ------------------------------------------------------------------

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
        self.session = Session(device, tokens, self, lambda p: connectProtocol(endpoint, p),
                               self.reactor, self.where, new_token=o.register, **kw)
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
            self.notice("waiting for the answer to %s" % _count(waiting, "message"))
        d = session.when_idle()
        d.addTimeout(self.options.timeout, self.reactor)

        def gave_up(f):
            f.trap(defer.TimeoutError)
            left = len(session.outbox)
            self.say("error", "gave up: %s not sent (no answer from %s within %g s)"
                     % (_count(left, "message"), self.where, self.options.timeout))
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


class Conversation(App):
    """Interactive mode (a terminal or a pipe): typed lines are sent to the
    ``/to`` peer; incoming messages show as ``[hh:mm:ss] sender: text``.
    Everything goes to stdout, in order."""

    def begin(self):
        self.style = Style.for_stream(sys.stdout, self.environ)
        self.peer = self.options.to
        self.ended = False
        self.told_queued = False
        if self.options.id:
            self.connect(self.options.id)
        else:
            self.ask_id()

    def ask_id(self):
        self.write_out("your id (e.g. 0011001100): ", end="")

    def connect(self, device):
        self.make_session(device)
        self.say("info", "connecting to %s as %s; /help lists the commands" % (self.where, device))
        if self.peer:
            self.say("info", "talking to %s" % self.peer)
        self.session.start()

    def say(self, kind, text):
        self.write_out(self.style.paint(kind, text))

    def incoming(self, push, raw):
        return self.write_out(format_push(push, self.style))

    def line_typed(self, line):
        if self.finishing or self.ended:
            return
        if self.session is None:
            device = line.strip()
            if not device:
                return self.ask_id()
            if not ID_RE.match(device):
                self.say("error", "not a valid id: %r (1-64 characters from "
                                  "A-Z a-z 0-9 _ . : @ + -)" % device)
                return self.ask_id()
            return self.connect(device)
        command = parse_command(line)
        if command.kind == "to":
            self.peer = command.peer
            self.say("info", "talking to %s" % self.peer)
            if command.text is not None:
                self.send(command.text)
        elif command.kind == "send":
            self.send(command.text)
        elif command.kind == "help":
            self.say("info", HELP)
        elif command.kind == "quit":
            self.input_ended()
        elif command.kind == "bad":
            self.say("error", command.text)

    def send(self, text):
        if self.peer is None:
            self.say("error", "not sent: who to? pick someone with /to ID first")
            return
        self.session.send(self.peer, text)
        if not self.session.offline:
            self.told_queued = False
        elif not self.told_queued:
            # said once per outage (not while the first connection is being made)
            self.told_queued = True
            self.say("info", "not connected; what you type is sent once the "
                             "connection is back")

    def input_ended(self):
        if self.ended:
            return
        self.ended = True
        self.finish_when_sent(0)


class Listener(App):
    """``--listen``: each incoming message as one JSON line on stdout (the
    push as received), acked once written; status lines on stderr. Runs until
    SIGINT or SIGTERM (or ``--count N`` messages). stdin is not read: a
    listener started from a script, cron or systemd has it at its end or
    closed, and that means nothing to it."""

    uses_stdio = False

    def begin(self):
        self.shown = 0
        self.make_session(self.options.id)
        self.session.start()

    def incoming(self, push, raw):
        if self.finishing or not self.write_out(raw):
            return False
        self.shown += 1
        if self.options.count and self.shown >= self.options.count:
            self.finish(0)  # its ack is flushed by the session's stop
        return True


class OneShot(App):
    """``--send ID TEXT``: send once and exit 0 (accepted), 1 (duplicate or
    refused, the reason on stderr) or 2 (could not connect or register, or no
    answer within --timeout). stdin is not read."""

    uses_stdio = False

    def begin(self):
        receiver, text = self.options.send
        self.make_session(self.options.id, one_shot=True, retry_first=False)
        self.later(self.options.timeout, self.timed_out)
        self.session.start()
        self.session.send(receiver, text)

    def answered(self, entry, reply):
        kind, words = describe_reply(entry.receiver, reply)
        if kind == "ok":
            write_line(1, "%s (id %s)" % (words, reply.get("id")))
            self.finish(0)
        else:
            write_stderr(words.replace("error: ", "not sent: ", 1))
            self.finish(1)

    def timed_out(self):
        s = self.session
        if s.ready:
            why = "no answer from %s within %g s" % (self.where, self.options.timeout)
        elif s.conn is not None:
            why = "could not register at %s within %g s" % (self.where, self.options.timeout)
        else:
            why = "could not connect to %s within %g s" % (self.where, self.options.timeout)
        write_stderr(why)
        self.finish(2)


# -- the command line ------------------------------------------------------------------

def _port(text):
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a port number: %r" % text) from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError("not a port number: %r" % text)
    return port


def _device(text):
    if not ID_RE.match(text):
        raise argparse.ArgumentTypeError(
            "not a valid id: %r (1-64 characters from A-Z a-z 0-9 _ . : @ + -)" % text)
    return text


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not value > 0:
        raise argparse.ArgumentTypeError("not a positive number of seconds: %r" % text)
    return value


def _count_arg(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError("not a positive whole number: %r" % text)
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="chatd-client",
        description="Chat with a chatd server from a terminal, a script or a pipe.",
        epilog="Interactive: /to ID picks who you talk to, a plain line sends to them, "
               "/help, /quit. The token of each id is kept in the state directory and "
               "reused; incoming messages are acked once shown.")
    parser.add_argument("host", metavar="HOST")
    parser.add_argument("port", metavar="PORT", type=_port)
    parser.add_argument("--id", type=_device, metavar="ID",
                        help="your id (asked for when absent in interactive mode)")
    parser.add_argument("--to", type=_device, metavar="ID",
                        help="talk to ID from the start (as /to ID)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--send", nargs=2, metavar=("ID", "TEXT"),
                      help="send TEXT to ID and exit: 0 accepted, 1 duplicate or "
                           "refused, 2 could not connect or register")
    mode.add_argument("--listen", action="store_true",
                      help="print each incoming message as a JSON line and ack it, "
                           "until SIGINT/SIGTERM (stdin is not read); status on stderr")
    parser.add_argument("--count", type=_count_arg, metavar="N",
                        help="with --listen: exit 0 after N messages")
    parser.add_argument("--register", action="store_true",
                        help="register anew (a new token) instead of reusing the saved one")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="where tokens are kept (default: $XDG_STATE_HOME/chatd-client "
                             "or ~/.local/state/chatd-client)")
    parser.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                        help="how long --send, and the end of input, wait for answers "
                             "(default 10)")
    options = parser.parse_args(argv)
    if options.send is not None:
        try:
            _device(options.send[0])
        except argparse.ArgumentTypeError as e:
            parser.error("--send: %s" % e)
    if options.count and not options.listen:
        parser.error("--count goes with --listen")
    if (options.send is not None or options.listen) and not options.id:
        parser.error("--%s needs --id" % ("send" if options.send is not None else "listen"))
    return options


def main(argv=None):
    options = parse_args(sys.argv[1:] if argv is None else argv)
    from twisted.internet import reactor
    if options.send is not None:
        app = OneShot(options, reactor, os.environ)
    elif options.listen:
        app = Listener(options, reactor, os.environ)
    else:
        app = Conversation(options, reactor, os.environ)
    sys.exit(app.run())


if __name__ == "__main__":
    main()
