"""
The operator's window into a running node: ``--metrics ENDPOINT`` serves
``/metrics`` (Prometheus text format, through prometheus_client's own Twisted
resource) and ``/health`` (a load balancer's or an orchestrator's probe).

The numbers are not counted here. The hot path bumps plain integers
(:mod:`chatd.wire.stats` on the connections' factory, :mod:`chatd.redis.stats`
on the store client) and :class:`ChatdCollector` turns them into metric
families when Prometheus scrapes, in a thread of the reactor's pool (that is
how ``prometheus_client.twisted.MetricsResource`` runs the exposition); it
only copies what it reads. ``/health`` instead runs in the reactor, because
it asks the store for a PING through the node's own store client: the same
path chat traffic takes, so a frozen store shows as one.

Every series carries a ``node`` label (:func:`node_name`), so that the
series of several nodes can be told apart and summed.
"""

import json
import os
import socket
import sys

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.twisted import MetricsResource
from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.web import resource, server

from chatd.netio import loopback
from chatd.redis.stats import LATENCY_BUCKETS
from chatd.wire.stats import Stats

#: message results and error codes always exported (0 until they happen),
#: so that rate() and alerts work from the first scrape
RESULTS = ("accepted", "duplicate", "unknown_receiver", "inbox_full", "unavailable")
ERROR_CODES = (
    "bad_packet", "unknown_packet", "missing_field", "bad_field", "line_too_long",
    "not_registered", "bad_token", "forbidden", "unknown_receiver",
    "message_too_long", "inbox_full", "rate_limited", "bad_ack", "unavailable",
    "session_replaced", "auth_timeout", "idle_timeout", "slow_consumer",
    "shutdown", "revoked")
#: results of a message packet that are also error replies (the session
#: counts them once, as results; the collector adds them to the errors)
_RESULT_ERRORS = ("unknown_receiver", "inbox_full")

_DEFAULT_NODE = "%s:%d" % (socket.gethostname(), os.getpid())


def node_name(chat):
    """The ``node`` label of a node's series: its node id once it has one
    (the ``node_id`` attribute of the ChatService), else ``host:pid``.
    Read at every scrape, so it may be set after start."""
    return getattr(chat, "node_id", None) or _DEFAULT_NODE


def _label(name):
    return name.decode("ascii", "replace").lower() if isinstance(name, bytes) else name


class ChatdCollector:
    """chatd's own metric families, built from a :class:`ChatService`'s
    counters at each scrape (zeros while it starts)."""

    def __init__(self, chat):
        self.chat = chat

    def collect(self):
        chat = self.chat
        node = node_name(chat)
        factory = chat.factory
        hub = factory.hub if factory is not None else None
        client = chat.client
        stats = factory.stats if factory is not None else Stats()
        messages = dict(stats.messages)
        errors = dict(stats.errors)
        for code in _RESULT_ERRORS:
            errors[code] = errors.get(code, 0) + messages.get(code, 0)

        m = CounterMetricFamily(
            "chatd_messages", "Message packets by result: accepted, duplicate, or the "
            "error code they got (unknown_receiver, inbox_full, unavailable, bad_token, ...)",
            labels=["node", "result"])
        for result in sorted(set(RESULTS) | set(messages)):
            m.add_metric([node, result], messages.get(result, 0))
        yield m

        e = CounterMetricFamily(
            "chatd_errors", "Error lines sent to clients, by code (closing ones included)",
            labels=["node", "code"])
        for code in sorted(set(ERROR_CODES) | set(errors)):
            e.add_metric([node, code], errors.get(code, 0))
        yield e

        yield _one(CounterMetricFamily, "chatd_slow_consumer",
                   "Connections closed because the client stopped reading",
                   node, errors.get("slow_consumer", 0))
        yield _one(CounterMetricFamily, "chatd_pushes",
                   "Messages pushed to devices (a message pushed again on a new "
                   "connection counts again)", node, stats.pushes)
        yield _one(CounterMetricFamily, "chatd_acks", "Valid ack packets taken", node, stats.acks)
        yield _one(CounterMetricFamily, "chatd_token_reuse",
                   "Old tokens presented again after their successor was used (a copy): "
                   "every token of the id was revoked", node,
                   hub.token_reuse if hub is not None else 0)
        yield _one(GaugeMetricFamily, "chatd_connections", "Open client connections",
                   node, len(factory.connections) if factory is not None else 0)
        yield _one(GaugeMetricFamily, "chatd_bound_devices",
                   "Devices bound (registered or reconnected) on this node",
                   node, len(hub.sessions) if hub is not None else 0)
        reads = hub.reads if hub is not None else None
        yield _one(GaugeMetricFamily, "chatd_inbox_reads",
                   "Inbox reads (drain batches) in flight (at most drain_reads)",
                   node, reads.busy if reads is not None else 0)
        yield _one(GaugeMetricFamily, "chatd_inbox_reads_waiting",
                   "Drains waiting for their turn to read the inbox",
                   node, reads.waiting if reads is not None else 0)
        yield _one(GaugeMetricFamily, "chatd_binds_waiting",
                   "Registers and reconnects waiting for their turn (at most bind_turns "
                   "in flight)", node, hub.binds.waiting if hub is not None else 0)
        store = hub.store if hub is not None else None
        yield _one(GaugeMetricFamily, "chatd_store_queue",
                   "Sends and acks queued for the store or in flight",
                   node, store.load if store is not None else 0)

        store_stats = client.stats if client is not None else None
        yield _one(CounterMetricFamily, "chatd_store_unavailable",
                   "Store calls that failed (deadline, lost connection, error reply, "
                   "a batch run too late): each one answered 'unavailable'",
                   node, store_stats.unavailable if store_stats is not None else 0)
        yield _one(CounterMetricFamily, "chatd_store_unconfirmed",
                   "Writes the store did but fewer than --store-acks replicas confirmed "
                   "in time (answered 'unavailable'; a retry with the same ref is safe)",
                   node, store_stats.unconfirmed if store_stats is not None else 0)
        r = CounterMetricFamily(
            "chatd_store_redirects", "Redis Cluster replies that sent a call elsewhere or "
            "back (MOVED, ASK, TRYAGAIN, CLUSTERDOWN); the call was retried",
            labels=["node", "kind"])
        redirects = dict(store_stats.redirects) if store_stats is not None else {}
        for kind in sorted(set(("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")) | set(redirects)):
            r.add_metric([node, kind], redirects.get(kind, 0))
        yield r
        h = HistogramMetricFamily(
            "chatd_store_seconds", "Latency of store calls, by script (Lua function) "
            "or command; one call carries a whole batch of sends or acks",
            labels=["node", "script"])
        if store_stats is not None:
            bounds = [repr(float(b)) for b in LATENCY_BUCKETS] + ["+Inf"]
            for name, (counts, total) in sorted(store_stats.snapshot().items(),
                                                key=lambda kv: _label(kv[0])):
                h.add_metric([node, _label(name)], list(zip(bounds, counts)), total)
        yield h
        sweeper = getattr(chat, "sweeper", None)
        yield _one(CounterMetricFamily, "chatd_receipts_swept",
                   "Redis Cluster: receipts this node's outbox sweeper found left in a "
                   "receiver's outbox (a node died, or its move failed, between the ack and "
                   "the move) and made", node, sweeper.moved if sweeper is not None else 0)
        inboxes = getattr(chat, "inbox_sweeper", None)
        yield _one(CounterMetricFamily, "chatd_inboxes_swept",
                   "Inboxes left without a TTL (made by one message that was never acked) "
                   "that this node's inbox sweeper gave the TTL of their newest message",
                   node, inboxes.given if inboxes is not None else 0)
        presence = getattr(chat, "presence", None)
        yield _one(CounterMetricFamily, "chatd_presence_reaped",
                   "Presence records of dead nodes (their heartbeat ran out) this node "
                   "deleted as the reaper", node, getattr(presence, "reaped", 0))
        yield from _push_families(chat, node)


PUSH_RESULTS = ("sent", "rejected", "failed", "retried", "dropped")


def _push_families(chat, node):
    """Push wake-ups (with --push-url): results, gateway latency, due."""
    waker = getattr(chat, "waker", None)
    stats = waker.stats if waker is not None else None
    t = CounterMetricFamily("chatd_push", "Wake-ups sent to the push gateway, by result "
                            "(retried: a 5xx, 429, timeout or connection failure, tried "
                            "again; dropped: failing past --push-retry-for)",
                            labels=["node", "result"])
    for result in PUSH_RESULTS:
        t.add_metric([node, result], stats.results.get(result, 0) if stats else 0)
    yield t
    h = HistogramMetricFamily("chatd_push_seconds", "Latency of push gateway requests",
                              labels=["node"])
    if stats is not None:
        snap = stats.latency.snapshot().get("gateway")
        if snap:
            bounds = [repr(float(b)) for b in LATENCY_BUCKETS] + ["+Inf"]
            h.add_metric([node], list(zip(bounds, snap[0])), snap[1])
    yield h
    yield _one(GaugeMetricFamily, "chatd_push_due", "Wake-ups due (found in the store's "
               "due index by this node's last full scan, plus those in flight here)", node,
               (stats.due_seen + waker.inflight) if stats else 0)


def _one(kind, name, doc, node, value):
    family = kind(name, doc, labels=["node"])
    family.add_metric([node], value)
    return family


def registry_for(chat):
    """A registry of its own per node (no global state: tests run several
    nodes in one process): chatd's families plus the process, platform
    and garbage collector ones."""
    registry = CollectorRegistry()
    registry.register(ChatdCollector(chat))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class Health(resource.Resource):
    """``GET /health``: 200 and ``{"status": "ok", ...}`` while the node
    listens and its store answers a PING within the store deadline
    (``--redis-timeout``); otherwise 503 and ``{"status": "unavailable",
    "reason": ...}`` (starting, shutting down, store not answering). Nothing
    is cached: each probe asks again (concurrent probes share one PING), so
    it turns 200 again by itself once the store answers."""

    isLeaf = True

    def __init__(self, chat, clock):
        super().__init__()
        self.chat = chat
        self.clock = clock
        self._ping = None  # the PING in flight: [waiters]

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(result):
            if gone:
                return
            code, body = result
            request.setResponseCode(code)
            request.write(json.dumps(body, sort_keys=True).encode() + b"\n")
            request.finish()

        self.check().addCallback(answer)
        return server.NOT_DONE_YET

    def check(self):
        """Deferred of (HTTP status, body); never fails."""
        chat = self.chat
        node = node_name(chat)
        if not chat.running:
            why = "shutting down" if chat.factory is not None else "not started"
            return defer.succeed((503, {"status": "unavailable", "reason": why, "node": node}))
        if not chat.ports or chat.client is None:
            return defer.succeed((503, {"status": "unavailable", "node": node,
                                        "reason": "starting (waiting for the store)"}))
        d = defer.Deferred()
        if self._ping is None:
            self._ping = [d]
            self._start_ping(chat, node)
        else:
            self._ping.append(d)
        return d

    def _start_ping(self, chat, node):
        timeout = chat.settings.redis_timeout
        started = self.clock.seconds()
        waiters = self._ping

        def done(result):
            if self._ping is not waiters:
                return  # answered already (a reply after the deadline)
            self._ping = None
            if timer.active():
                timer.cancel()
            for d in waiters:
                d.callback(result)

        def ok(reply):
            if reply not in (b"PONG", "PONG"):
                return failed("the store answered PING with %r" % (reply,))
            factory = chat.factory
            done((200, {"status": "ok", "node": node,
                        "store_ms": round((self.clock.seconds() - started) * 1000, 3),
                        "connections": len(factory.connections),
                        "bound_devices": len(factory.hub.sessions)}))

        def failed(why):
            done((503, {"status": "unavailable", "node": node,
                        "reason": "the store did not answer: %s" % why}))

        # the PING is not cancelled at the deadline: a reply of the pipelined
        # store connection must reach its own caller (and the client's
        # watchdog cuts a connection that stopped answering)
        timer = self.clock.callLater(
            timeout, failed, "no reply to PING within %gs" % timeout)
        chat.client.call(b"PING").addCallbacks(ok, lambda f: failed(f.getErrorMessage()))


class _QuietSite(server.Site):
    """No access log line per scrape."""

    noisy = False

    def log(self, request):
        pass


class MetricsService(service.Service):
    """The ``--metrics`` listener of one node. In the service tree it sits
    before the chat service, so it stops after it: while the node shuts
    down, ``/health`` says so (503) instead of refusing connections."""

    log = Logger()

    def __init__(self, description, chat, reactor=None):
        self.description = description
        self.chat = chat
        self.reactor = reactor
        self.port = None
        self._listening = None

    def site(self):
        root = resource.Resource()
        root.putChild(b"metrics", MetricsResource(registry_for(self.chat)))
        root.putChild(b"health", Health(self.chat, self.reactor))
        return _QuietSite(root)

    def startService(self):
        service.Service.startService(self)
        if self.reactor is None:
            from twisted.internet import reactor
            self.reactor = reactor
        endpoint = endpoints.serverFromString(self.reactor, self.description)
        self._listening = endpoint.listen(self.site())
        self._listening.addCallbacks(self._listened, self._failed)

    def _listened(self, port):
        self.port = port
        host = port.getHost()
        where = getattr(host, "name", None) or "%s:%s" % (host.host, host.port)
        self.log.info("chatd metrics listening on {where} (/metrics, /health)", where=where)
        if not loopback(host):
            self.log.warn(
                "metrics are served on {where}, which other machines can reach: anyone "
                "there can read this node's counters and load it with scrapes. Listen "
                "on 127.0.0.1 (tcp:9100:interface=127.0.0.1) or a unix socket, or keep "
                "the port behind a firewall.", where=where)

    def _failed(self, failure):
        """Not listening is a failed start (an operator asked for metrics):
        say why and stop."""
        self.log.error("chatd metrics could not listen on {where}: {why}",
                       where=self.description, why=failure.getErrorMessage())
        print("chatd: --metrics %s: %s" % (self.description, failure.getErrorMessage()),
              file=sys.stderr)
        self.reactor.callWhenRunning(self.reactor.stop)

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        if self._listening is not None:
            yield self._listening.addErrback(lambda f: None)
        if self.port is not None:
            yield self.port.stopListening()
            self.port = None
