"""
The interactive terminal client (a terminal or a pipe): what is typed (plain
lines to the ``/to`` peer, ``/to``, ``/help``, ``/quit``) and the
:class:`Conversation` that shows incoming messages as ``[hh:mm:ss] sender:
text``.
"""

import sys
from dataclasses import dataclass
from typing import Optional

from chatd.client.formatting import Style, format_push, format_receipt
from chatd.client.run import App
from chatd.wire.packets import ID_RE

HELP = """\
commands:
  /to ID         talk to ID: each plain line is then sent to ID
  /to ID TEXT    talk to ID and send TEXT
  /help          this help
  /quit          leave (Ctrl-D, the end of input, does the same)
  //TEXT         send a line that starts with "/"
incoming messages show as [time] sender: text"""


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

    def receipt(self, push, raw):
        """Under the sent lines: "✓✓ delivered to R" / "✓✓ read by R"."""
        return self.write_out(self.style.paint("ok", format_receipt(push)))

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
