"""
The HTTP side of a ``--websocket`` listener: the chat page (``page/``) at
``/`` and the WebSocket handshake at ``/ws`` (what follows the upgrade is
:mod:`chatd.wire.websocket`).

An HTTP connection is a client connection too: it is counted against
``--max-connections`` (and ``--max-connections-per-ip``) from the moment it
is made, by the same admission as a session (:meth:`ChatFactory.admit_http`),
and cut ``--auth-timeout`` after it was made unless it has become a
WebSocket by then (its session counts from the upgrade on, once). A
connection over a cap is answered ``503`` (the page and the handshake
alike) and closed.

The handshake (docs/protocol.rst, "WebSocket Origin"): a request that is no
upgrade gets ``426`` (no ``Upgrade`` header) or ``400`` (a malformed one), a
browser's ``Origin`` other than the listener's own or one of
``--websocket-origin`` gets ``403``; none of them is logged as an error.

The page is never framed (``X-Frame-Options``, CSP ``frame-ancestors``), a
path that names no file is a ``404`` (not a 500 and a traceback), a
``Range`` of several parts is served as the whole file (one part at most,
so that 100 parts of a 4 KB file do not make 1 MB), and no access-log line
is written unless ``--access-log`` asks for it.
"""

import os
import re
import urllib.parse

from twisted.web import http, resource, server, static
from twisted.web.websocket import WebSocketResource
from wsproto import ConnectionType
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

from chatd.wire.websocket import Sessions

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page")

UPGRADE_REQUIRED = 426  # (twisted.web.http names no constant for it)

#: a connection refused at a cap has this long to read its 503
REFUSED_GRACE = 5.0

_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST = re.compile(r"^(?:[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?\.?)+$|^[0-9a-f:.]+$")

#: on every answer of the site: the page is never shown inside another
#: site's frame (a CSP in a meta tag cannot say frame-ancestors)
SECURITY_HEADERS = (
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
)


def parse_origin(text):
    """``scheme://host[:port]`` (http or https) -> ``(scheme, host, port)``,
    lower case, the default port filled in; ValueError if it is not that."""
    text = str(text).strip()
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError("%r is not an origin" % text) from None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if (scheme not in _DEFAULT_PORTS or not host or "@" in parts.netloc
            or parts.path not in ("", "/") or parts.query or parts.fragment
            or not _HOST.match(host)):
        raise ValueError("%r is not an origin (http:// or https://, a host, an "
                         "optional :port, nothing else)" % text)
    return scheme, host, port or _DEFAULT_PORTS[scheme]


def own_origin(request):
    """The listener's origin as the browser reached it: its scheme, and the
    host and port of the request's Host header; None without a usable one."""
    scheme = "https" if request.isSecure() else "http"
    host = request.getHeader(b"host")
    if not host:
        return None
    try:
        return parse_origin("%s://%s" % (scheme, host.decode("latin-1")))
    except ValueError:
        return None


class Page(static.File):
    """The page's files; a path that cannot name one (a NUL, bytes that are
    not UTF-8) is a plain 404."""

    def getChild(self, path, request):
        if b"\0" in path:
            return self.childNotFound
        try:
            path.decode("utf-8")
            return super().getChild(path, request)
        except ValueError:  # not UTF-8; or a name the file system refuses
            return self.childNotFound

    def render_GET(self, request):
        ranges = request.getHeader(b"range")
        if ranges is not None and b"," in ranges:
            # several parts: the whole file instead (RFC 9110 allows it)
            request.requestHeaders.removeHeader(b"range")
        return super().render_GET(request)


class Handshake(WebSocketResource):
    """``/ws``: refuses, in plain HTTP and without an error log, what is not
    a WebSocket handshake chatd accepts, then lets Twisted upgrade."""

    def __init__(self, sessions, origins):
        super().__init__(sessions)
        self.origins = frozenset(parse_origin(o) for o in origins)

    def render_GET(self, request):
        if request.getHeader(b"upgrade") is None:
            request.setHeader(b"upgrade", b"websocket")
            return _plain(request, UPGRADE_REQUIRED,
                          b"this is chatd's WebSocket: connect with a WebSocket client\n")
        headers = [(k, v) for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs]
        try:
            H11Handshake(ConnectionType.SERVER).initiate_upgrade_connection(
                headers, request.path)
        except RemoteProtocolError as e:
            return _plain(request, http.BAD_REQUEST,
                          b"not a WebSocket handshake: %s\n" % str(e).encode("utf-8", "replace"))
        origin = request.getHeader(b"origin")
        if origin is not None and not self.allowed(origin.decode("latin-1"), request):
            return _plain(request, http.FORBIDDEN,
                          b"this origin may not open chatd's WebSocket\n")
        return super().render_GET(request)

    def allowed(self, origin, request):
        try:
            origin = parse_origin(origin)
        except ValueError:
            return False  # "null" (a file, a sandboxed frame) and other junk
        return origin in self.origins or origin == own_origin(request)


def _plain(request, code, body):
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return body


class _Refused(resource.Resource):
    isLeaf = True

    def __init__(self, reason):
        super().__init__()
        self.reason = reason

    def render(self, request):
        request.setHeader(b"retry-after", b"10")
        transport = request.channel.transport
        request.notifyFinish().addBoth(lambda _: transport.loseConnection())
        return _plain(request, http.SERVICE_UNAVAILABLE,
                      ("too_many_connections: %s\n" % self.reason).encode("utf-8"))


class Channel(http.HTTPChannel):
    """An HTTP/1.1 connection of the site, admitted like a session, and cut
    at ``--auth-timeout`` unless upgraded."""

    refusal = None   # why it is over a cap, if it is
    _cut = None      # the delayed call that cuts it

    def connectionMade(self):
        super().connectionMade()
        chat = self.site.chat_factory
        self.refusal = chat.admit_http(self)
        wait = chat.settings.auth_timeout
        if self.refusal:
            wait = min(wait, REFUSED_GRACE)
        self._cut = chat.clock.callLater(wait, self._expired)

    def _expired(self):
        self._cut = None
        self.transport.abortConnection()

    def upgraded(self):
        """It is a WebSocket now: its session counts it from here on (this
        channel's ``connectionLost`` is the WebSocket's from the upgrade on)."""
        self._stop()

    def connectionLost(self, reason):
        self._stop()
        super().connectionLost(reason)

    def _stop(self):
        if self._cut is not None:
            self._cut.cancel()
            self._cut = None
        self.site.chat_factory.release(self)


class Site(server.Site):
    """The site of a ``--websocket`` listener: HTTP/1.1 channels of our own
    (no HTTP/2: a WebSocket upgrade is HTTP/1.1)."""

    noisy = False
    protocol = Channel

    def __init__(self, chat_factory):
        settings = chat_factory.settings
        root = Page(PAGE)
        root.putChild(b"ws", Handshake(Sessions(chat_factory), settings.websocket_origins))
        super().__init__(root, timeout=settings.auth_timeout)
        self.chat_factory = chat_factory
        self.access_log = settings.access_log

    def getResourceFor(self, request):
        for name, value in SECURITY_HEADERS:
            request.setHeader(name, value)
        refusal = request.channel.refusal
        if refusal:
            return _Refused(refusal)
        return super().getResourceFor(request)

    def log(self, request):
        if self.access_log:
            super().log(request)


def site(chat_factory):
    """The web site of a ``--websocket`` listener: the page, and ``/ws``."""
    return Site(chat_factory)
