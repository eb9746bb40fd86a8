"""
The settings of one chatd node, and the parsers that turn option text into them.

``chatd.app.tap.Options`` uses the parsers as coercers, so a bad value is refused
by twistd's option parser with a message that names the option; the rest of
chatd only ever sees a validated :class:`Settings`.
"""

import os
import re
import stat
from dataclasses import dataclass, field
from typing import Optional

from chatd.redis.target import RedisTarget
from chatd.redis.tls import load_certificates


@dataclass(frozen=True)
class Settings:
    """Every tunable of a chatd node, with the defaults of the contract."""

    port: str = "tcp:5000"
    listen: tuple = ()
    websocket: tuple = ()  # endpoints of the web page + WebSocket listeners
    websocket_origins: tuple = ()  # origins besides a listener's own allowed at /ws
    access_log: bool = False  # an access-log line per HTTP request of those listeners
    redis: Optional[RedisTarget] = None  # None: the embedded store
    data_dir: str = "chatd-data"
    store_max_memory: int = 1 << 30  # the embedded store's maxmemory (bytes)
    redis_timeout: float = 2.0
    store_acks: int = 0  # replicas that must confirm a write (WAIT) before it is answered
    dedup_window: float = 5.0
    max_line: int = 65536
    max_message: int = 16384
    inbox_limit: int = 10000
    inbox_ttl: float = 30 * 86400.0
    ref_ttl: float = 86400.0
    auth_timeout: float = 30.0
    keepalive: float = 60.0
    idle_timeout: float = 300.0
    rate_limit: float = 50.0  # message packets per second, 0 = unlimited
    rate_burst: int = 100
    output_limit: int = 1 << 20  # bytes queued for a client that does not read
    max_connections: int = 0  # 0: the open-files limit, less some headroom
    max_connections_per_ip: int = 0  # 0: no per-address cap
    registration: str = "open"
    registration_secret: Optional[bytes] = field(default=None, repr=False)
    proof_max_age: float = 600.0  # a proof ticket must expire within this
    token_rotation: bool = True   # a new token at every reconnect (contract 1.2)
    receipts: bool = True         # delivery and read receipts (contract 1.2)
    outbox_sweep: float = 5.0     # Redis Cluster: mean seconds between outbox sweeps
    inbox_sweep: float = 60.0     # mean seconds between the inbox sweeper's passes
    drain_batch: int = 500
    drain_reads: int = 64  # inbox reads in flight per node (chatd.hub.turns)
    bind_turns: int = 256  # registers and reconnects in flight per node
    metrics: Optional[str] = None  # endpoint of /metrics and /health
    presence_lease: float = 10.0  # a dead node's devices are free after this
    workers: int = 1              # processes of this node (chatd.app.workers)
    push_url: Optional[str] = None  # the push gateway (None: no push wake-ups)
    push_interval: float = 30.0   # at most one more wake-up per this while away
    push_unacked: float = 15.0    # a pushed message unacked this long: a wake-up
    push_content: str = "none"    # none | sender | full
    push_timeout: float = 10.0    # deadline of one gateway request
    push_retry_for: float = 3600.0  # how long a failing wake-up is retried
    push_ca_file: Optional[str] = None  # CAs of an https gateway's certificate


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]i?[bB]?|[bB])?\s*$")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 * 1024, "g": 1024 ** 3}


def parse_switch(text, name):
    """``on`` or ``off`` (also yes/no, true/false, 1/0) as a bool."""
    value = str(text).strip().lower()
    if value in ("on", "yes", "true", "1"):
        return True
    if value in ("off", "no", "false", "0"):
        return False
    raise ValueError("--%s: %r is not on or off" % (name, text))


def parse_duration(text, name, allow_zero=False):
    """``"2"``, ``"2s"``, ``"500ms"``, ``"5m"``, ``"24h"``, ``"30d"`` -> seconds."""
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError(
            "--%s: %r is not a duration (a number of seconds, or a number "
            "with a unit: 500ms, 5s, 10m, 24h, 30d)" % (name, text))
    value = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError("--%s: must be more than 0, got %r" % (name, text))
    return value


PUSH_CONTENT = ("none", "sender", "full")


def parse_push_url(text, name="push-url"):
    """An http or https URL of a push gateway; ``none`` (or empty): none."""
    from urllib.parse import urlsplit
    text = str(text).strip()
    if text.lower() in ("", "none"):
        return None
    try:
        parts = urlsplit(text)
        parts.port  # a bad port raises
    except ValueError as e:
        raise ValueError("--%s: %r is not a URL (%s)" % (name, text, e)) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("--%s: %r is not an http:// or https:// URL (for Sygnal: "
                         "https://host/_matrix/push/v1/notify)" % (name, text))
    return text


def parse_push_content(text, name="push-content"):
    value = str(text).strip().lower()
    if value not in PUSH_CONTENT:
        raise ValueError("--%s: %r is not none, sender or full" % (name, text))
    return value


def parse_workers(text, name):
    """A count of processes, 0 meaning one per core."""
    import os
    try:
        n = int(str(text).strip())
    except ValueError:
        raise ValueError("--%s: %r is not a whole number" % (name, text)) from None
    if n < 0:
        raise ValueError("--%s: must be 0 (one per core) or more, got %r" % (name, text))
    return n or os.cpu_count() or 1


def parse_size(text, name, minimum=1):
    """``"65536"``, ``"64k"``, ``"1MiB"`` -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(
            "--%s: %r is not a size (bytes, or with a unit: 64k, 1M)" % (name, text))
    unit = (m.group(2) or "").lower()[:1]
    value = int(m.group(1)) * _SIZE_UNITS[unit]
    if value < minimum:
        raise ValueError("--%s: must be at least %d bytes, got %r" % (name, minimum, text))
    return value


def parse_count(text, name, minimum=1):
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError("--%s: %r is not a whole number" % (name, text)) from None
    if value < minimum:
        raise ValueError("--%s: must be at least %d, got %r" % (name, minimum, text))
    return value


def parse_rate(text, name):
    try:
        value = float(str(text).strip().removesuffix("/s"))
    except ValueError:
        raise ValueError(
            "--%s: %r is not a rate (packets per second, e.g. 50; 0 turns "
            "the limit off)" % (name, text)) from None
    if value < 0:
        raise ValueError("--%s: must not be negative, got %r" % (name, text))
    return value


def parse_endpoint(text, name):
    """A bare port number means ``tcp:N``; anything else must be a Twisted
    server endpoint description (``tcp:5000:interface=127.0.0.1``,
    ``ssl:5443:privateKey=key.pem:certKey=cert.pem``, ``unix:/path``)."""
    text = str(text).strip()
    if text.isdigit():
        port = int(text)
        if port > 65535:
            raise ValueError("--%s: port %s is out of range (0-65535)" % (name, text))
        return "tcp:%d" % port
    from twisted.internet import endpoints, reactor
    if ":" not in text:
        raise ValueError(
            "--%s: %r is neither a port number nor a Twisted endpoint "
            "(tcp:5000, tcp:5000:interface=127.0.0.1, ssl:5443:privateKey=key.pem, "
            "unix:/run/chatd.sock)" % (name, text))
    # build (not open) the endpoint now, so that a typo, an unknown kind or
    # a missing certificate fails at start rather than at listen time
    try:
        endpoints.serverFromString(reactor, text)
    except Exception as e:
        raise ValueError("--%s: %r: %s" % (name, text, e)) from None
    return text


def parse_origin(text, name="websocket-origin"):
    """A web origin, ``http(s)://host[:port]``, as a browser sends it in its
    ``Origin`` header; returned as given (less outer spaces)."""
    from chatd.wire.web import parse_origin as origin
    try:
        origin(text)
    except ValueError as e:
        raise ValueError("--%s: %s" % (name, e)) from None
    return str(text).strip()


#: the listen backlog of a tcp or ssl endpoint that names none: Twisted's 50
#: overflows when every phone reconnects at once (after a restart), and each
#: connection that overflows waits for a SYN retransmit (1 s, 3 s...). The
#: kernel caps it at net.core.somaxconn.
DEFAULT_BACKLOG = 1024


def with_backlog(description):
    """The endpoint description, with ``:backlog=DEFAULT_BACKLOG`` added to
    a tcp, tcp6 or ssl endpoint that gives no backlog of its own."""
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "ssl") and not re.search(r"(?:^|:)backlog=", description):
        return "%s:backlog=%d" % (description, DEFAULT_BACKLOG)
    return description


#: the shortest registration secret accepted: an HMAC-SHA256 key of fewer
#: bytes than its output can be guessed more cheaply than the MAC
MIN_SECRET = 32


def read_secret_file(path, name="registration-secret-file", minimum=MIN_SECRET):
    """The bytes of a secret file, less one trailing LF or CRLF if there is
    one (an editor's or ``echo``'s); refused when shorter than ``minimum``.
    Returns ``(secret, warning)``: the warning (or None) says the file can be
    read by other users."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            secret = f.read()
    except OSError as e:
        raise ValueError("--%s: cannot read %r: %s" % (name, path, e.strerror)) from None
    if secret.endswith(b"\r\n"):
        secret = secret[:-2]
    elif secret.endswith(b"\n"):
        secret = secret[:-1]
    if not secret:
        raise ValueError("--%s: %r is empty" % (name, path))
    if len(secret) < minimum:
        raise ValueError(
            "--%s: %r holds %d bytes; a secret must have at least %d (e.g. "
            "head -c 48 /dev/urandom | base64 > FILE)" % (name, path, len(secret), minimum))
    warning = None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warning = ("--%s: %s can be read by other users (mode %04o); chmod 600 it"
                   % (name, path, stat.S_IMODE(mode)))
    return secret, warning


def check_ca_file(path, name="redis-ca-file"):
    """The CA file must be readable and hold at least one PEM certificate."""
    try:
        load_certificates(path)
    except OSError as e:
        raise ValueError("--%s: cannot read %r: %s" % (name, path, e.strerror)) from None
    except Exception as e:
        raise ValueError("--%s: %r: not a PEM certificate file (%s)" % (name, path, e)) from None
