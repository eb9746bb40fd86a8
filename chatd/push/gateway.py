"""
The push gateway's HTTP client and the request body (contract 1.2, "The
request", "The answer").
"""

import json

import treq
from twisted.internet import defer, ssl
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from chatd.store import layout

#: requests to the gateway in flight at once, at most (more wait their turn)
MAX_INFLIGHT = 64
#: the outcomes (see push_done.lua)
SENT, REJECTED, RETRY, FAILED = "sent", "rejected", "retry", "failed"


def body(claimed, content="none"):
    """The Matrix Push Gateway API v1 notification of a claimed wake-up
    (:class:`chatd.store.pushsteps.Claimed`): content-free unless
    ``content`` is ``sender`` or ``full``."""
    newest = claimed.newest
    notification = {
        "event_id": layout.entry_id_text(newest) if newest else "",
        "type": "chatd.message",
        "prio": "high",
        "counts": {"unread": claimed.unread},
        "devices": [{"app_id": claimed.app, "pushkey": claimed.pushkey,
                     "pushkey_ts": claimed.ts, "data": {}}],
    }
    if content in ("sender", "full") and newest:
        message = json.loads(newest)
        notification["sender"] = message["sender"]
        if content == "full":
            notification["content"] = {"body": message["message"]}
    return json.dumps({"notification": notification}).encode("utf-8")


def trust(ca_file):
    """The TLS policy: the system's CAs, plus (``--push-ca-file``) those of
    the file. Either way the certificate and the host name are checked."""
    if not ca_file:
        return BrowserLikePolicyForHTTPS()
    with open(ca_file, "rb") as f:
        pem = f.read()
    certs = []
    for block in pem.split(b"-----END CERTIFICATE-----")[:-1]:
        certs.append(ssl.Certificate.loadPEM(block + b"-----END CERTIFICATE-----\n"))
    authorities = ssl.trustRootFromCertificates(certs)

    class SystemAnd(type(authorities)):
        """The system's trusted CAs, and the file's besides."""

        def _addCACertsToContext(self, context):
            context.set_default_verify_paths()
            super()._addCACertsToContext(context)

    return BrowserLikePolicyForHTTPS(SystemAnd([c.original for c in certs]))


class Gateway:
    """POSTs to one gateway URL. :meth:`notify` gives the outcome, never
    fails: ``(outcome, seconds, detail)``."""

    def __init__(self, url, reactor, timeout, ca_file=None, max_inflight=MAX_INFLIGHT,
                 node_id="-"):
        #: which node sent a request (for the gateway's logs)
        self.user_agent = b"chatd (node %s)" % node_id.encode("ascii")
        self.url = url.encode("utf-8") if isinstance(url, str) else url
        self.reactor = reactor
        self.timeout = timeout
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = max_inflight
        self.pool.retryAutomatically = False
        agent = Agent(reactor, contextFactory=trust(ca_file), pool=self.pool,
                      connectTimeout=timeout)
        self.http = treq.client.HTTPClient(agent)
        self._slots = defer.DeferredSemaphore(max_inflight)

    def notify(self, data, pushkey):
        return self._slots.run(self._post, data, pushkey)

    @defer.inlineCallbacks
    def _post(self, data, pushkey):
        start = self.reactor.seconds()
        try:
            d = self.http.post(self.url, data=data,
                               headers={b"Content-Type": [b"application/json"],
                                        b"User-Agent": [self.user_agent]})
            d.addTimeout(self.timeout, self.reactor)
            response = yield d
            d = response.content()
            d.addTimeout(self.timeout, self.reactor)
            content = yield d
        except Exception as e:
            return RETRY, self.reactor.seconds() - start, "no answer (%s)" % (
                type(e).__name__,)
        seconds = self.reactor.seconds() - start
        code = response.code
        if 200 <= code < 300:
            try:
                rejected = json.loads(content).get("rejected") or []
            except (ValueError, AttributeError):
                rejected = []
            if pushkey in rejected:
                return REJECTED, seconds, "HTTP %d, rejected" % code
            return SENT, seconds, "HTTP %d" % code
        if code >= 500 or code == 429:
            return RETRY, seconds, "HTTP %d" % code
        return FAILED, seconds, "HTTP %d" % code

    def close(self):
        return self.pool.closeCachedConnections()
