"""
The bare relay: the ceiling of this stack, for the same run.

A Twisted ``LineReceiver`` with chatd's framing (``\\n``, JSON in and out,
compact replies, TCP_NODELAY) and nothing else: no Redis, every state in
memory. It speaks enough of the protocol for the load generator:

* ``register`` -> ``registered`` (a fresh token; its SHA-256 is kept), takeover
  of an older connection of the id (``session_replaced``), then the waiting
  messages are pushed;
* ``reconnect`` (token checked) -> ``reconnected`` with ``pending``, then the
  waiting messages;
* ``message`` -> ``accepted`` (id: a 16-digit per-receiver counter) and a push
  to the receiver's connection, or kept in memory until it comes back;
  ``duplicate`` for the same text to the same receiver within the dedup
  window; a retry of a known ``(sender, ref)`` gets the first reply again;
  ``unknown_receiver``, ``inbox_full``;
* ``ack`` (cumulative) -> dropped from memory;
* ``ping`` -> ``pong``.

Push lines have chatd's exact layout, so that one generator drives both.
The dedup and ref rules are the cheapest possible in-memory version of
chatd's (dict lookups, expiry from the head of a deque), so that the
comparison of chatd's dedup and retry paths has a ceiling too.

Run: ``python -m benchmarks.relay --port 0`` (prints
``relay listening on tcp 127.0.0.1:PORT``).
"""

import argparse
import collections
import hashlib
import hmac
import json
import secrets
import sys
import time

from twisted.internet import protocol
from twisted.protocols.basic import LineReceiver

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_enc_str = json.encoder.encode_basestring  # the C encoder of one string (no ASCII escaping)
_KINDS = frozenset(("register", "reconnect", "message", "ack", "ping"))


def _enc(value):
    """One JSON value as bytes (strings and null without the general encoder)."""
    if value is None:
        return b"null"
    if isinstance(value, str):
        return _enc_str(value).encode("utf-8")
    return _dumps(value).encode("utf-8")


def _reply(obj):
    return (_dumps(obj) + "\n").encode("utf-8")


def _error(code, reason, ref=None):
    return _reply({"type": "error", "code": code, "reason": reason, "ref": ref})


class Device:
    """What the relay keeps per destinationId."""

    __slots__ = ("enc", "token_hash", "seq", "inbox", "conn")

    def __init__(self, device_id):
        self.enc = _enc(device_id)  # the id as JSON, for push lines and replies
        self.token_hash = None
        self.seq = 0
        # (id, push line without newline), oldest first: a deque from the
        # first message on, the empty tuple until then (a deque is 768
        # bytes: the leanest honest relay keeps no more per idle device
        # than it must)
        self.inbox = ()
        self.conn = None


class State:
    """Everything the relay knows (one per process)."""

    def __init__(self, dedup_window=5.0, ref_ttl=86400.0, inbox_limit=10000):
        self.devices = {}
        self.dedup_window = dedup_window
        self.ref_ttl = ref_ttl
        self.inbox_limit = inbox_limit
        self.dedup = {}                       # (receiver, text) -> expiry
        self.dedup_order = collections.deque()  # (expiry, key), oldest first
        self.refs = {}                        # (receiver, sender, ref) -> reply line
        self.ref_order = collections.deque()

    def expire(self, now):
        order, table = self.dedup_order, self.dedup
        while order and order[0][0] <= now:
            expiry, key = order.popleft()
            if table.get(key) == expiry:
                del table[key]
        order, table = self.ref_order, self.refs
        while order and order[0][0] <= now:
            expiry, key = order.popleft()
            table.pop(key, None)


class RelayProtocol(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 65537

    device = None   # the bound destinationId
    first_pushed = None
    last_pushed = 0

    def connectionMade(self):
        self.state = self.factory.state
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass

    def connectionLost(self, reason):
        if self.device is not None:
            dev = self.state.devices.get(self.device)
            if dev is not None and dev.conn is self:
                dev.conn = None
            self.device = None

    def lineLengthExceeded(self, line):
        self.transport.write(_error("line_too_long", "line too long"))
        self.transport.loseConnection()

    def lineReceived(self, line):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            return
        try:
            obj = json.loads(line.decode("utf-8"))
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            return self.transport.write(_error("bad_packet", "not a JSON object"))
        ref = obj.get("ref")
        kinds = _KINDS.intersection(obj)
        if len(kinds) != 1:
            return self.transport.write(_error("unknown_packet", "one packet kind needed", ref))
        (kind,) = kinds
        _DISPATCH[kind](self, obj, ref)

    # -- packets -----------------------------------------------------------------

    def _sender(self, obj, ref):
        sender = obj.get("sender")
        if not isinstance(sender, str) or not 0 < len(sender) <= 64:
            self.transport.write(_error("missing_field", "field 'sender' is required", ref))
            return None
        if self.device is not None and self.device != sender:
            self.transport.write(_error("forbidden", "bound to another id", ref))
            return None
        return sender

    def do_register(self, obj, ref):
        sender = self._sender(obj, ref)
        if sender is None:
            return
        token = secrets.token_urlsafe(24)
        dev = self.state.devices.get(sender)
        if dev is None:
            dev = self.state.devices[sender] = Device(sender)
        dev.token_hash = hashlib.sha256(token.encode()).digest()
        self.transport.write(_reply({"type": "registered", "sender": sender, "token": token}))
        self._bind(sender, dev)

    def do_reconnect(self, obj, ref):
        sender = self._sender(obj, ref)
        if sender is None:
            return
        dev = self.state.devices.get(sender)
        token = obj.get("token")
        if dev is None or not isinstance(token, str) or not hmac.compare_digest(
                hashlib.sha256(token.encode()).digest(), dev.token_hash):
            return self.transport.write(_error("bad_token", "wrong or revoked token", ref))
        self.transport.write(_reply({"type": "reconnected", "sender": sender,
                                     "pending": len(dev.inbox)}))
        self._bind(sender, dev)

    def _bind(self, sender, dev):
        if dev.conn is self:
            return  # registering again on the same connection: nothing more
        old = dev.conn
        if old is not None:
            old.device = None
            old.transport.write(_error("session_replaced", "connected elsewhere"))
            old.transport.loseConnection()
        dev.conn = self
        self.device = sender
        if dev.inbox:
            self.first_pushed = dev.inbox[0][0]
            self.last_pushed = dev.inbox[-1][0]
            self.transport.write(b"\n".join([e for _, e in dev.inbox]) + b"\n")

    def do_message(self, obj, ref):
        state = self.state
        text = obj["message"]
        receiver = obj.get("receiver")
        if not isinstance(text, str) or not isinstance(receiver, str):
            return self.transport.write(_error("bad_field", "message and receiver must be strings", ref))
        sender = self.device
        if sender is None or "sender" in obj or "token" in obj:
            sender = obj.get("sender")
            dev = state.devices.get(sender) if isinstance(sender, str) else None
            token = obj.get("token")
            if self.device is not None and sender != self.device:
                return self.transport.write(_error("forbidden", "bound to another id", ref))
            if dev is None or (token is None and self.device is None):
                return self.transport.write(_error("not_registered", "register first", ref))
            if token is not None and (not isinstance(token, str) or not hmac.compare_digest(
                    hashlib.sha256(token.encode()).digest(), dev.token_hash)):
                return self.transport.write(_error("bad_token", "wrong or revoked token", ref))
        now = time.monotonic()
        state.expire(now)
        if ref is not None:
            ref_key = (receiver, sender, ref)
            first = state.refs.get(ref_key)
            if first is not None:
                return self.transport.write(first)
        rdev = state.devices.get(receiver)
        if rdev is None:
            return self.transport.write(_error("unknown_receiver", "%s has never registered"
                                               % receiver, ref))
        window = state.dedup_window
        if window > 0:
            key = (receiver, text)
            expiry = state.dedup.get(key)
            if expiry is not None and expiry > now:
                reply = b'{"type":"duplicate","receiver":%s,"ref":%s}\n' % (rdev.enc, _enc(ref))
                if ref is not None:
                    self._remember(ref_key, reply, now)
                return self.transport.write(reply)
        if len(rdev.inbox) >= state.inbox_limit:
            return self.transport.write(_error("inbox_full", "inbox full", ref))
        rdev.seq += 1
        sid = rdev.seq
        server_id = b"%016d" % sid
        sdev = state.devices.get(sender)
        entry = b'{"type":"message","id":"%s","sent_at":%d,"sender":%s,"receiver":%s,"message":%s}' % (
            server_id, int(time.time() * 1000), sdev.enc if sdev is not None else _enc(sender),
            rdev.enc, _enc_str(text).encode("utf-8"))
        if rdev.inbox.__class__ is tuple:
            rdev.inbox = collections.deque()
        rdev.inbox.append((sid, entry))
        if window > 0:
            expiry = now + window
            state.dedup[key] = expiry
            state.dedup_order.append((expiry, key))
        conn = rdev.conn
        if conn is not None:
            if conn.first_pushed is None:
                conn.first_pushed = sid
            conn.last_pushed = sid
            conn.transport.write(entry + b"\n")
        reply = b'{"type":"accepted","id":"%s","receiver":%s,"ref":%s}\n' % (
            server_id, rdev.enc, _enc(ref))
        if ref is not None:
            self._remember(ref_key, reply, now)
        self.transport.write(reply)

    def _remember(self, key, reply, now):
        expiry = now + self.state.ref_ttl
        self.state.refs[key] = reply
        self.state.ref_order.append((expiry, key))

    def do_ack(self, obj, ref):
        if self.device is None:
            return self.transport.write(_error("not_registered", "ack needs a registered connection", ref))
        try:
            upto = int(obj["ack"])
        except (TypeError, ValueError):
            return self.transport.write(_error("bad_ack", "not an id", ref))
        if self.first_pushed is None or not self.first_pushed <= upto <= self.last_pushed:
            return self.transport.write(_error("bad_ack", "id not pushed on this connection", ref))
        inbox = self.state.devices[self.device].inbox
        while inbox and inbox[0][0] <= upto:
            inbox.popleft()

    def do_ping(self, obj, ref):
        self.transport.write(_reply({"type": "pong", "ping": obj["ping"]}))


_DISPATCH = {"register": RelayProtocol.do_register, "reconnect": RelayProtocol.do_reconnect,
             "message": RelayProtocol.do_message, "ack": RelayProtocol.do_ack,
             "ping": RelayProtocol.do_ping}


class RelayFactory(protocol.Factory):
    protocol = RelayProtocol
    noisy = False

    def __init__(self, state):
        self.state = state


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.relay", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--interface", default="127.0.0.1")
    p.add_argument("--dedup-window", type=float, default=5.0)
    p.add_argument("--ref-ttl", type=float, default=86400.0)
    p.add_argument("--inbox-limit", type=int, default=10000)
    p.add_argument("--backlog", type=int, default=1024, help="listen backlog (chatd's default)")
    args = p.parse_args(argv)
    from twisted.internet import epollreactor
    epollreactor.install()
    from twisted.internet import reactor
    import signal

    state = State(args.dedup_window, args.ref_ttl, args.inbox_limit)
    port = reactor.listenTCP(args.port, RelayFactory(state), backlog=args.backlog,
                             interface=args.interface)
    addr = port.getHost()
    print("relay listening on tcp %s:%d" % (addr.host, addr.port), flush=True)
    signal.signal(signal.SIGTERM, lambda *a: reactor.callFromThread(reactor.stop))
    reactor.run(installSignalHandlers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
