"""
Where the store lives (:class:`RedisTarget`), and the ``--redis`` URL forms
that name it. The password is never printed (:func:`redact_url`,
:meth:`RedisTarget.describe`).
"""

import re
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
    # the sentinels' own password (--sentinel-password-file), never printed
    sentinel_password: Optional[str] = field(default=None, repr=False)

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


_URL_FORMS = ("expected redis://[:password@]host:port/db, rediss://host:port/db, "
              "unix:///path.sock?db=N, redis+sentinel://host:port[,host:port...]/master/db "
              "or redis+cluster://host:port[,host:port...]")


def _parse_sentinel_url(text, u, name, user, password):
    """``redis+sentinel://[[user]:password@]h:p[,h:p...]/<master>[/<db>]``
    (``rediss+sentinel`` for TLS to the primary). The password is the
    primary's; the sentinels are asked without one."""
    def refuse(problem):
        raise ValueError("--%s: %r: %s (%s)" % (name, redact_url(text), problem, _URL_FORMS))

    hosts = u.netloc
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
    return RedisTarget(
        kind="sentinel", sentinels=tuple(sentinels), master=parts[0],
        db=int(parts[1]) if len(parts) == 2 and parts[1] else 0,
        username=user, password=password, tls=u.scheme.startswith("rediss"))


def parse_redis_url(text, name="redis"):
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS),
    ``unix:///path/to.sock[?db=N][&password=...]``,
    ``redis+sentinel://h:p[,h:p...]/<master>/<db>`` (``rediss+sentinel``), and
    ``redis+cluster://[[user]:password@]host:port[,host:port...]`` (or
    ``rediss+cluster://``)."""
    text = str(text).strip()
    bare, user, password = _userinfo(text)
    u = urlsplit(bare)
    problem = None
    if u.scheme in ("redis+sentinel", "rediss+sentinel"):
        return _parse_sentinel_url(text, u, name, user, password)
    if u.scheme in ("redis+cluster", "rediss+cluster"):
        return _cluster_target(u, text, name, user, password)
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
    if u.scheme == "unix":
        q = parse_qs(u.query)
        password = q.get("password", [password])[0]
    return RedisTarget(
        host=host, port=port, path=path, db=int(db_text),
        username=user, password=password, tls=(u.scheme == "rediss"))


def _cluster_target(u, text, name, user, password):
    """A cluster URL: seeds host:port separated by commas (urlsplit cannot
    parse several ports, so the host part is split here), database 0 only."""
    netloc = u.netloc
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
    return RedisTarget(host=seeds[0][0], port=seeds[0][1],
                       username=user, password=password,
                       tls=u.scheme.startswith("rediss"), kind="cluster", seeds=tuple(seeds))


_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*")


def _userinfo(text):
    """``(the URL without its user info, user, password)``. The user info is
    everything between ``://`` and the *last* ``@``, so a password may hold
    ``/``, ``@`` or ``:`` as typed (urlsplit ends it at the first ``/``);
    ``%XX`` escapes are decoded. User and password are None when absent."""
    scheme, sep, rest = text.partition("://")
    if not sep or "@" not in rest:
        return text, None, None
    userinfo, _, hosts = rest.rpartition("@")
    user, _, password = userinfo.partition(":")
    return (scheme + "://" + hosts, unquote(user) or None, unquote(password) or None)


def redact_url(text):
    """A store URL fit to print: everything between ``://`` and the last
    ``@`` (user and password), and a ``password=`` query value, replaced
    by ``***``."""
    text = str(text)
    scheme, sep, rest = text.partition("://")
    if sep and "@" in rest:
        text = scheme + "://***@" + rest.rpartition("@")[2]
    return _QUERY_PASSWORD.sub(r"\1***", text)
