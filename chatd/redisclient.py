"""
The one connection to the store, and the one path every call takes.

txredisapi waits forever for a connection while Redis is down, and a reply
that never comes keeps its caller waiting too. Here every call gets a deadline
(``--redis-timeout``), and every way it can fail (deadline, lost connection,
refused, an error reply) comes out as :class:`StoreUnavailable`, which the
protocol answers with ``unavailable``.

Lua scripts live in ``chatd/lua/<name>.lua`` and are called by name with
EVALSHA; after a store restart (which forgets scripts) the first call falls
back to EVAL, which loads the script again.
"""

import hashlib
import os

import txredisapi
from twisted.internet import defer
from twisted.logger import Logger

LUA_DIR = os.path.join(os.path.dirname(__file__), "lua")


class StoreUnavailable(Exception):
    """The store could not do what was asked in time; nothing can be assumed
    stored (a reply lost after the store acted is possible: clients retry with
    a ``ref``)."""


class Script:
    """A Lua script from ``chatd/lua``, after the shared ``_prelude.lua``,
    with its SHA1 for EVALSHA."""

    def __init__(self, name):
        self.name = name
        self.source = _read_lua("_prelude") + _read_lua(name)
        self.sha = hashlib.sha1(self.source).hexdigest()


def _read_lua(name):
    with open(os.path.join(LUA_DIR, name + ".lua"), "rb") as f:
        return f.read()


class RedisClient:
    """A lazily connected txredisapi pool with deadlines.

    One connection is used on purpose: txredisapi spreads commands over its
    pool at random, and one pipelined connection keeps the replies in the
    order the store executed them (which delivery relies on to push live
    messages without a read-back) at no cost in throughput.
    """

    log = Logger()

    def __init__(self, target, timeout, reactor):
        self.target = target
        self.timeout = timeout
        self.reactor = reactor
        self._scripts = {}
        self._handler = None

    def connect(self):
        t = self.target
        # txredisapi's own reply timeout aborts a connection whose reply is
        # late, so that a dead peer is replaced; ours (a little later) also
        # covers the wait for a connection while the store is down
        common = dict(dbid=t.db or None, password=t.password, poolsize=1,
                      reconnect=True, charset=None, convertNumbers=False,
                      replyTimeout=self.timeout * 0.9, connectTimeout=self.timeout)
        if t.username:
            common["username"] = t.username
        if t.path:
            handler = txredisapi.lazyUnixConnectionPool(t.path, **common)
        else:
            handler = txredisapi.lazyConnectionPool(t.host, t.port, ssl_context_factory=t.tls,
                                                     **common)
        # recover within a couple of seconds of the store coming back
        handler._factory.maxDelay = 2
        handler._factory.initialDelay = 0.2
        self._handler = handler
        return self

    def close(self):
        """Disconnect; the Deferred fires when the connection is gone."""
        handler, self._handler = self._handler, None
        if handler is None:
            return defer.succeed(None)
        return handler.disconnect().addErrback(lambda f: None)

    def call(self, *args):
        """Run one command; Deferred of its reply (bytes, int, list, None)."""
        if self._handler is None:
            return defer.fail(StoreUnavailable("not connected"))
        try:
            d = self._handler.execute_command(*args)
        except Exception as e:  # raised synchronously: not connected
            return defer.fail(StoreUnavailable(str(e)))
        d.addTimeout(self.timeout, self.reactor)
        return d.addErrback(self._unavailable, args[0])

    def script(self, name, keys, args):
        """Run the Lua script ``chatd/lua/<name>.lua``; Deferred of its reply."""
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = Script(name)
        d = self._raw(b"EVALSHA", script.sha, len(keys), *keys, *args)
        d.addErrback(self._noscript, script, keys, args)
        d.addTimeout(self.timeout, self.reactor)
        return d.addErrback(self._unavailable, name)

    def _raw(self, *args):
        if self._handler is None:
            return defer.fail(StoreUnavailable("not connected"))
        try:
            return self._handler.execute_command(*args)
        except Exception as e:
            return defer.fail(StoreUnavailable(str(e)))

    def _noscript(self, failure, script, keys, args):
        if failure.check(txredisapi.ResponseError) and \
                str(failure.value).startswith(("NOSCRIPT", b"NOSCRIPT")):
            return self._raw(b"EVAL", script.source, len(keys), *keys, *args)
        return failure

    def _unavailable(self, failure, what):
        if failure.check(StoreUnavailable):
            return failure
        if failure.check(defer.TimeoutError, defer.CancelledError):
            reason = "no reply within %gs" % self.timeout
        else:
            reason = "%s: %s" % (failure.type.__name__, failure.getErrorMessage())
        if isinstance(what, bytes):
            what = what.decode("ascii", "replace")
        if failure.check(txredisapi.ResponseError):
            # an error reply is a bug or a misconfigured store, not an outage
            self.log.error("store error on {what}: {reason}", what=what, reason=reason)
        raise StoreUnavailable("%s: %s" % (what, reason))
