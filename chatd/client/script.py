"""
The terminal client in scripts: ``--listen`` (each incoming message as a JSON
line on stdout) and ``--send`` (send once; the exit status says how it went).
Neither reads stdin.
"""

from chatd.client.formatting import describe_reply
from chatd.client.run import App, write_line, write_stderr


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

    def receipt(self, push, raw):
        """A receipt (1.2) as its JSON line too (not counted by --count)."""
        return not self.finishing and self.write_out(raw)


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
