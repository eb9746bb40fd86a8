"""
The service tree of a chatd node, started and stopped in order:

1. the embedded store (unless ``--redis`` names one), which must answer PING
   before anything else starts;
2. the chat service: the store client, then the listeners.

Stopping runs backwards, one step at a time: stop listening, let in-flight
packets finish, send ``shutdown`` to every client, close the store client,
and only then stop the embedded store.
"""

import gc
import sys

from twisted.application import service
from twisted.internet import address, defer, endpoints
from twisted.logger import Logger

from chatd.app.ports import listen as listen_shared
from chatd.app.config import with_backlog
from chatd.app.workers import WorkerPool
from chatd.netio import loopback as _loopback
from chatd.hub.presence import Presence, new_node_id
from chatd.hub.router import Hub
from chatd.hub.sweeper import InboxSweeper, OutboxSweeper
from chatd.push.gateway import Gateway
from chatd.push.waker import Waker
from chatd.store.pushsteps import PushSteps
from chatd.ops.metrics import MetricsService
from chatd.redis.client import RedisClient
from chatd.redis.cluster import ClusterClient, ClusterError
from chatd.redis.embedded import EmbeddedStore
from chatd.redis.embedded_dir import EmbeddedStoreError
from chatd.redis.sentinel import SentinelEndpoint, SentinelError, UnknownMaster
from chatd.redis.target import RedisTarget
from chatd.store.library import Library
from chatd.store.notify import Notifications
from chatd.store.steps import Store
from chatd.wire.factory import ChatFactory
from chatd.wire.web import site

#: allocations between two collections of the youngest generation (Python's
#: default is 700: under load that was a collection every few messages)
GC_THRESHOLD = 20000


def tune_gc():
    """For a process that serves chatd (twistd's, a worker's), not for a
    library user: the objects of start-up (modules, settings, the service
    tree) are never garbage, so the cyclic collector is kept off them (after
    one collection, so that no garbage is frozen with them); and it collects
    less often, since a message makes a dozen short-lived containers."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)


class SequentialMultiService(service.MultiService):
    """A MultiService whose children stop one after another, last first
    (MultiService stops them all at once)."""

    log = Logger()

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        for child in reversed(list(self)):
            try:
                yield child.stopService()
            except Exception:
                self.log.failure("stopping {child}", child=child)


class StoreConfigError(Exception):
    """The store named by --redis cannot work as given (not an outage)."""


class ChatService(service.Service):
    """The store client and the listeners, started once the store is ready."""

    log = Logger()

    def __init__(self, settings, target, ready=None, reactor=None, role="chatd", ports=None):
        self.settings = settings
        self.role = role     # how its log lines name it (a worker has its number)
        self.shared = settings.workers > 1 or ports is not None
        self.given_ports = ports  # a worker: the parent's port numbers
        self.target = target
        self.ready = ready  # callable -> Deferred that fires when the store is up
        self.reactor = reactor
        self.node_id = new_node_id()
        self.client = None
        self.presence = None
        self.waker = None  # push wake-ups (--push-url)
        self.sweeper = None  # receipt outboxes (Redis Cluster, --receipts on)
        self.inbox_sweeper = None  # inboxes left without a TTL
        self.factory = None
        self.ports = []
        self.web_ports = []  # --websocket listeners
        self._starting = None

    def startService(self):
        service.Service.startService(self)
        if self.reactor is None:
            from twisted.internet import reactor
            self.reactor = reactor
        self._starting = self._start()
        self._starting.addErrback(self._failed)

    @defer.inlineCallbacks
    def _start(self):
        if self.ready is not None:
            yield self.ready()
        if self.target.sentinels:
            yield self._check_sentinels()
        self.client = store_client(self.target, self.settings, self.reactor).connect()
        connected = yield self.client.when_connected(self.settings.redis_timeout)
        if not connected:
            self.log.warn("the store ({store}) is not answering yet; clients get "
                          "'unavailable' until it does", store=self.target.describe())
        if self.settings.redis is not None:
            self._check_policy((yield self.client.config_get(b"maxmemory-policy")))
        store = Store(self.client, self.settings, self.reactor, self.node_id)
        # messages stored before this node started (by an older release,
        # without rs) are acked carefully (chatd/store/layout.py "rcpt:turned")
        turned = store.receipts_turned().addErrback(lambda f: self.log.warn(
            "could not raise the receipts stamp ({why}): messages an older release "
            "stored may miss their receipts", why=f.value))
        if connected:
            yield turned
        notifications = Notifications(self.target, self.settings.redis_timeout, self.reactor,
                                      self.client)
        self.presence = Presence(store, notifications, self.settings, self.reactor)
        s = self.settings
        if s.push_url:
            self.waker = Waker(PushSteps(store), Gateway(s.push_url, self.reactor,
                                                         s.push_timeout, s.push_ca_file,
                                                         node_id=self.node_id),
                               s, self.reactor)
            self.waker.start()
        if store.uses_outboxes:
            self.sweeper = OutboxSweeper(store, self.reactor, s.outbox_sweep)
            self.sweeper.start()
        self.inbox_sweeper = InboxSweeper(store, self.reactor, s.inbox_sweep)
        self.inbox_sweeper.start()
        hub = Hub(store, self.settings, self.reactor, self.presence, self.waker)
        self.presence.start(hub)
        self.log.info("{role} node {node} starting", role=self.role, node=self.node_id)
        self.factory = ChatFactory(self.settings, hub, self.reactor)
        chat = (self.settings.port,) + tuple(self.settings.listen)
        for i, description in enumerate(chat):
            port = yield self._listen(description, self.factory, i)
            if port is None:
                continue
            self.ports.append(port)
            host = port.getHost()
            where = getattr(host, "name", None) or "%s:%s" % (host.host, host.port)
            self.log.info("{role} listening on {kind} {where} (store: {store})",
                          role=self.role, kind=description.split(":", 1)[0], where=where,
                          store=self.target.describe())
            if self.settings.registration == "open" and not _loopback(host):
                self.log.warn(
                    "registration is open on {where}, which other machines can reach: "
                    "anyone can register any id, take it over and read the messages "
                    "waiting for it. Use --registration claim (first register keeps "
                    "an id) or proof (a signed ticket), or listen on 127.0.0.1.",
                    where=where)

        if self.settings.websocket:
            web = site(self.factory)
        for i, description in enumerate(self.settings.websocket):
            port = yield self._listen(description, web, len(chat) + i)
            if port is None:
                continue
            self.web_ports.append(port)
            host = port.getHost()
            scheme = "https" if description.startswith("ssl:") else "http"
            where = getattr(host, "name", None) or "%s://%s:%s/" % (scheme, host.host, host.port)
            self.log.info("{role} web page on {where} (WebSocket at /ws)", role=self.role,
                          where=where)

    def _listen(self, description, factory, index):
        """Listen on one endpoint (a backlog of 1024 unless it says otherwise):
        Deferred of the port, or of None for a worker's unix socket (the
        parent's alone). With --workers every process listens on the same
        TCP/TLS port (``SO_REUSEPORT``); a worker is given the parent's port
        numbers (``given_ports``: the chat listeners, then the web ones), so
        that a port 0 resolves to the same port everywhere."""
        description = with_backlog(description)
        if not self.shared:
            return endpoints.serverFromString(self.reactor, description).listen(factory)
        if self.given_ports is not None and description.startswith("unix:"):
            return defer.succeed(None)
        given = self.given_ports[index] if self.given_ports is not None else None
        return listen_shared(self.reactor, description, factory, given)

    @defer.inlineCallbacks
    def _check_sentinels(self):
        """A master name no sentinel knows is a mistake to say at start (the
        store client would only ever answer 'unavailable'); sentinels that
        cannot be reached now are an outage, which chatd rides out."""
        try:
            yield SentinelEndpoint(self.reactor, self.target,
                                   self.settings.redis_timeout).find_primary()
        except UnknownMaster as e:
            raise StoreConfigError("--redis: %s" % e)
        except SentinelError as e:
            self.log.warn("no store primary found yet ({why}); clients get "
                          "'unavailable' until there is one", why=str(e))

    def _check_policy(self, policy):
        """An external store that evicts when full deletes tokens and waiting
        messages (accepted, so promised) instead of refusing new writes."""
        if policy is not None and policy != b"noeviction":
            self.log.warn(
                "the store {store} has maxmemory-policy {policy}: when it is full it "
                "deletes keys (tokens, waiting messages) instead of refusing writes; "
                "set maxmemory-policy noeviction (and a maxmemory) for chatd",
                store=self.target.describe(), policy=policy.decode("ascii", "replace"))

    def started(self):
        """Deferred that fires once it listens."""
        d = defer.Deferred()
        self._starting.addBoth(lambda r: (d.callback(None), r)[1])
        return d

    #: why the node could not start (None: it started, or is starting)
    start_error = None

    def _failed(self, failure):
        self.start_error = failure.getErrorMessage() or failure.type.__name__
        if failure.check(ClusterError):  # the operator's to fix: no traceback
            self.log.error("chatd could not start: {e}", e=failure.getErrorMessage())
        else:
            self.log.failure("chatd could not start", failure)
        print("chatd: could not start: %s" % failure.getErrorMessage(), file=sys.stderr)
        if self.reactor.running:
            self.reactor.stop()

    def _shared_ports(self):
        """The TCP/TLS listeners (a unix socket is the parent's alone)."""
        return [p for p in self.ports + self.web_ports
                if not isinstance(p.getHost(), address.UNIXAddress)]

    def hold_accepting(self):
        """Accept no connection on the shared ports for now (they stay
        open: connections wait in the backlog). True if any was held."""
        held = self._shared_ports()
        for port in held:
            port.stopReading()
        return bool(held)

    def resume_accepting(self):
        for port in self._shared_ports():
            port.startReading()

    @defer.inlineCallbacks
    def stop_listening(self):
        """Close the listeners (the first step of a stop; with --workers the
        pool does it before it stops the workers, so that clients told
        ``shutdown`` by a worker do not come back to this process, which is
        about to stop too)."""
        ports, self.ports = self.ports + self.web_ports, []
        self.web_ports = []
        for port in ports:
            yield port.stopListening()

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        yield self.stop_listening()
        if self.factory is not None:
            yield self.factory.shutdown()
        if self.presence is not None:
            yield self.presence.stop()
        if self.waker is not None:
            yield self.waker.stop()
        if self.sweeper is not None:
            yield self.sweeper.stop()
        if self.inbox_sweeper is not None:
            yield self.inbox_sweeper.stop()
        if self.client is not None:
            yield self.client.close()


def store_client(target, settings, reactor):
    """The store client for ``target``: one connection, or (a Redis Cluster)
    one per primary, each made here with the same options."""
    library = Library()

    def make(t, writes=True):
        # the library and --store-acks on every connection that writes (a
        # seed asked only for the topology writes nothing)
        return RedisClient(t, settings.redis_timeout, reactor,
                           library=library if writes else None,
                           acks=settings.store_acks if writes else 0)

    if target.kind == "cluster":
        return ClusterClient(target, settings.redis_timeout, reactor, make)
    return make(target)


def build(settings):
    """The root service of a chatd node."""
    root = SequentialMultiService()
    if settings.redis is None:
        store = EmbeddedStore(settings.data_dir, max_memory=settings.store_max_memory)
        try:
            store.claim()
        except EmbeddedStoreError as e:
            raise SystemExit("chatd: %s" % e)
        store.setServiceParent(root)
        ready, target = store.whenReady, RedisTarget(path=store.socket_path)
    else:
        ready, target = None, settings.redis
    chat = ChatService(settings, target, ready)
    root.chat = chat
    if settings.metrics:
        # before the chat service: it stops after it (/health says "shutting down")
        MetricsService(settings.metrics, chat).setServiceParent(root)
    chat.setServiceParent(root)
    if settings.workers > 1:
        WorkerPool(chat, settings, target).setServiceParent(root)
    return root
