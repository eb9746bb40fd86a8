"""
Every Redis operation of chatd, and the layout of its keys.

Per destinationId ``D`` (every key carries the hash tag ``{D}``, so that all
of one receiver's data sits in one Redis Cluster slot and each Lua step
touches one slot):

``chatd:{D}:token``
    SHA-256 of D's current token. Exists = D is registered. Register
    overwrites it, which revokes every older token. Never expires.
``chatd:{D}:seq``
    D's id counter. Never expires, so ids keep increasing for the life of the
    store, across restarts and after the inbox empties.
``chatd:{D}:inbox``
    A list of D's waiting messages, oldest first, each stored as its push line
    (see :func:`chatd.packets.push_line`), so that a push is a copy, never a
    re-encoding. A list rather than a stream: reading it back through
    txredisapi is about 3x faster (flat replies), and ids are kept by the
    counter instead. Only the head is ever removed (acks, expiry), so the
    ids in it are consecutive and the scripts find an id by arithmetic.
``chatd:{D}:dedup:<hash of text>``
    Marks a text accepted for D within the dedup window (``SET PX``).
``chatd:{D}:ref:<hash of sender and ref>``
    The first reply to a (sender, ref) sent to D, for ``--ref-ttl``.
    Scoped to the receiver (the hash tag): a ref reused for another receiver
    is a new send.
"""

import hashlib
from dataclasses import dataclass
from typing import Optional

from chatd import packets


def _key(device, what):
    return "chatd:{%s}:%s" % (device, what)


def _keys(device):
    """The prefix of D's keys, as bytes (the hot path builds several)."""
    return b"chatd:{%s}:" % device.encode("ascii")


@dataclass(slots=True)
class SendResult:
    """What the store did with one message.

    status: ``accepted``, ``duplicate``, ``unknown_receiver`` or
    ``inbox_full``. ``replay`` is true when this is the first reply again for
    a known ref (nothing new was stored). ``entry`` is the push line of a
    newly accepted message.
    """

    status: str
    id: Optional[str] = None
    entry: Optional[bytes] = None
    replay: bool = False


_STATUS = {b"a": "accepted", b"d": "duplicate", b"u": "unknown_receiver",
           b"f": "inbox_full", b"ra": "accepted", b"rd": "duplicate"}


class Store:
    """chatd's operations on the store; each is one round trip."""

    def __init__(self, client, settings, clock):
        self.client = client
        self.clock = clock
        self._dedup_ms = int(settings.dedup_window * 1000)
        self._ttl_ms = int(settings.inbox_ttl * 1000)
        self._ref_ms = max(1, int(settings.ref_ttl * 1000))
        self._inbox_limit = settings.inbox_limit
        # the send script's fixed arguments, encoded once
        self._send_args = [str(v).encode("ascii") for v in (
            self._dedup_ms, self._inbox_limit, self._ttl_ms, self._ref_ms)]

    def _now_ms(self):
        return int(self.clock.seconds() * 1000)

    def register(self, device, token_hash):
        """Store D's new token (hash); every older token is revoked by it."""
        return self.client.call(b"SET", _key(device, "token"), token_hash)

    def token_hash(self, device):
        """D's stored token hash, or None if D never registered."""
        return self.client.call(b"GET", _key(device, "token"))

    def send(self, sender, receiver, text, ref=None):
        """Accept (or refuse) one message in one atomic step: ref retry,
        receiver check, dedup, inbox limit and TTL, enqueue."""
        now = self._now_ms()
        raw = text.encode("utf-8")
        prefix = _keys(receiver)
        keys = [prefix + b"token", prefix + b"seq", prefix + b"inbox",
                prefix + b"dedup:" + hashlib.blake2b(raw, digest_size=16).hexdigest().encode()]
        if ref is not None:
            ref_id = hashlib.blake2b(
                ("%s\0%r" % (sender, ref)).encode("utf-8"), digest_size=16).hexdigest()
            keys.append(prefix + b"ref:" + ref_id.encode())
        tail = packets.push_tail(sender, receiver, text)
        d = self.client.script("send", keys, [b"%d" % now, *self._send_args, tail])
        return d.addCallback(self._sent, now, tail)

    @staticmethod
    def _sent(reply, now, tail):
        code = reply[0]
        status = _STATUS[code]
        if code == b"a":
            server_id = reply[1].decode("ascii")
            return SendResult(status, server_id, packets.push_line(server_id, now, tail))
        if code == b"ra":
            return SendResult(status, reply[1].decode("ascii"), replay=True)
        return SendResult(status, replay=(code == b"rd"))

    def fetch(self, device, after, count):
        """D's waiting messages with ids after ``after`` (an int), at most
        ``count``: Deferred of ``(pending, last_id, entries)`` where pending
        counts all stored messages and last_id is D's id counter."""
        d = self.client.script("fetch", [_key(device, "inbox"), _key(device, "seq")],
                               [after, count, self._now_ms(), self._ttl_ms])
        return d.addCallback(lambda r: (int(r[0]), int(r[1]), r[2:]))

    def ack(self, device, upto):
        """Remove D's messages with ids up to ``upto`` (an int)."""
        return self.client.script("ack", [_key(device, "inbox")], [upto])
