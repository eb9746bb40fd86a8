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
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass(frozen=True)
class RedisTarget:
    """Where the store lives: a TCP host/port (optionally TLS) or a unix socket;
    or (``kind="cluster"``) a Redis/Valkey Cluster reached through any of its
    ``seeds`` ((host, port) pairs; host/port are the first)."""

    host: Optional[str] = None
    port: int = 6379
    path: Optional[str] = None  # unix socket
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)  # never printed
    tls: bool = False
    tls_ca_file: Optional[str] = None  # trust these CAs (else the system's)
    tls_verify: bool = True  # False only by an explicit, logged opt-out
    kind: str = "single"  # or "cluster", "sentinel"
    seeds: tuple = ()     # cluster: ((host, port), ...)
    # redis+sentinel://: the sentinels to ask (host, port) and the master's name;
    # host/port are then unset (the primary is whatever the sentinels say)
    sentinels: tuple = ()
    master: Optional[str] = None

    def describe(self):
        """A printable form without the password."""
        if self.kind == "cluster":
            return "%s+cluster://%s" % ("rediss" if self.tls else "redis",
                                        ",".join("%s:%d" % s for s in self.seeds))
        if self.sentinels:
            return "%s+sentinel://%s/%s/%d" % (
                "rediss" if self.tls else "redis",
                ",".join("%s:%d" % hp for hp in self.sentinels), self.master, self.db)
        if self.path:
            return "unix:%s?db=%d" % (self.path, self.db)
        scheme = "rediss" if self.tls else "redis"
        return "%s://%s:%d/%d" % (scheme, self.host, self.port, self.db)


@dataclass(frozen=True)
class Settings:
    """Every tunable of a chatd node, with the defaults of the contract."""

    port: str = "tcp:5000"
    listen: tuple = ()
    websocket: tuple = ()  # endpoints of the web page + WebSocket listeners
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
    drain_batch: int = 500
    metrics: Optional[str] = None  # endpoint of /metrics and /health
    presence_lease: float = 10.0  # a dead node's devices are free after this
    workers: int = 1              # processes of this node (chatd.app.workers)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]i?[bB]?|[bB])?\s*$")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 * 1024, "g": 1024 ** 3}


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


_URL_FORMS = ("expected redis://[:password@]host:port/db, rediss://host:port/db, "
              "unix:///path.sock?db=N, redis+sentinel://host:port[,host:port...]/master/db "
              "or redis+cluster://host:port[,host:port...]")


def _parse_sentinel_url(text, u, name):
    """``redis+sentinel://[[user]:password@]h:p[,h:p...]/<master>[/<db>]``
    (``rediss+sentinel`` for TLS to the primary). The password is the
    primary's; the sentinels are asked without one."""
    def refuse(problem):
        raise ValueError("--%s: %r: %s (%s)" % (name, redact_url(text), problem, _URL_FORMS))

    userinfo, _, hosts = u.netloc.rpartition("@")
    sentinels = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep:
            host, port = port, "26379"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            refuse("bad sentinel address %r (host:port)" % item)
        sentinels.append((host, int(port)))
    parts = [unquote(p) for p in u.path.split("/")[1:]]
    if not parts or not parts[0]:
        refuse("no master name (the name the sentinels monitor, e.g. /mymaster/0)")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        refuse("expected /<master>/<db> after the sentinels")
    user, _, password = userinfo.partition(":")
    return RedisTarget(
        kind="sentinel", sentinels=tuple(sentinels), master=parts[0],
        db=int(parts[1]) if len(parts) == 2 and parts[1] else 0,
        username=unquote(user) if user else None,
        password=unquote(password) if password else None,
        tls=u.scheme.startswith("rediss"))


def parse_redis_url(text, name="redis"):
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS),
    ``unix:///path/to.sock[?db=N][&password=...]``,
    ``redis+sentinel://h:p[,h:p...]/<master>/<db>`` (``rediss+sentinel``), and
    ``redis+cluster://[[user]:password@]host:port[,host:port...]`` (or
    ``rediss+cluster://``)."""
    text = str(text).strip()
    u = urlsplit(text)
    problem = None
    if u.scheme in ("redis+sentinel", "rediss+sentinel"):
        return _parse_sentinel_url(text, u, name)
    if u.scheme in ("redis+cluster", "rediss+cluster"):
        return _cluster_target(u, text, name)
    if u.scheme in ("redis", "rediss"):
        if not u.hostname:
            problem = "no host"
        try:
            port = u.port or 6379
        except ValueError:
            port, problem = 0, "bad port"
        db_text = u.path.lstrip("/") or "0"
        path = None
        host = u.hostname
    elif u.scheme == "unix":
        path = unquote(u.path)
        if not path.startswith("/"):
            problem = "the socket path must be absolute (unix:///run/redis.sock)"
        db_text = parse_qs(u.query).get("db", ["0"])[0]
        host, port = None, 6379
    else:
        problem = "unknown scheme %r" % (u.scheme or text)
        db_text, host, port, path = "0", None, 0, None
    if problem is None and not db_text.isdigit():
        problem = "the database number %r is not a number" % db_text
    if problem:
        raise ValueError(
            "--%s: %r: %s (%s)" % (name, redact_url(text), problem, _URL_FORMS))
    password = unquote(u.password) if u.password else None
    if u.scheme == "unix":
        q = parse_qs(u.query)
        password = q.get("password", [password])[0]
    return RedisTarget(
        host=host, port=port, path=path, db=int(db_text),
        username=unquote(u.username) if u.username else None,
        password=password, tls=(u.scheme == "rediss"))


def _cluster_target(u, text, name):
    """A cluster URL: seeds host:port separated by commas (urlsplit cannot
    parse several ports, so the host part is split here), database 0 only."""
    netloc = u.netloc.rpartition("@")[2]
    seeds, problem = [], None
    for part in netloc.split(","):
        host, _, port = part.strip().rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            problem = "%r is not host:port" % part
            break
        seeds.append((host, int(port)))
    if problem is None and u.path.strip("/") not in ("", "0"):
        problem = "a cluster has only database 0"
    if problem:
        raise ValueError(
            "--%s: %r: %s (expected redis+cluster://host:port[,host:port...])"
            % (name, redact_url(text), problem))
    userinfo = u.netloc.rpartition("@")[0]
    user, _, password = userinfo.partition(":")
    return RedisTarget(host=seeds[0][0], port=seeds[0][1],
                       username=unquote(user) if user else None,
                       password=unquote(password) if password else None,
                       tls=u.scheme.startswith("rediss"), kind="cluster", seeds=tuple(seeds))


_URL_PASSWORD = re.compile(r"(//[^/@:]*:)[^/@]*@")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*")


def redact_url(text):
    """A store URL fit to print: its password replaced by ``***``."""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", str(text)))


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


def load_certificates(path):
    """Every PEM certificate of a file (a CA bundle); ValueError if none."""
    from twisted.internet import ssl
    with open(path, "rb") as f:
        data = f.read()
    marker = b"-----END CERTIFICATE-----"
    pems = [part + marker for part in data.split(marker) if b"-----BEGIN CERTIFICATE" in part]
    if not pems:
        raise ValueError("%s holds no PEM certificate" % path)
    return [ssl.Certificate.loadPEM(pem) for pem in pems]
