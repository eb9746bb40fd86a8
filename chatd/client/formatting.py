"""
What the terminal client shows, as pure functions of what it is given: an
incoming message (``[hh:mm:ss] sender: text``, safe for a terminal), the
server's answer to a send, an error reply, a failed connection attempt, and
the colours (ANSI on a terminal only).
"""

import os
import time

from twisted.internet import defer, error

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


def format_receipt(push):
    """A receipt (1.2), shown under the lines sent: ``  ✓✓ delivered to R
    (up to <id>)`` or ``  ✓✓ read by R (up to <id>)``."""
    receiver = clean_text(str(push.get("receiver", "?")))
    upto = clean_text(str(push.get("upto", "?")))
    if push.get("status") == "read":
        return "  \u2713\u2713 read by %s (up to %s)" % (receiver, upto)
    return "  \u2713\u2713 delivered to %s (up to %s)" % (receiver, upto)


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


def plural(n, word):
    """``1 message``, ``3 messages``."""
    return "%s %s%s" % (n, word, "" if n == 1 else "s")
