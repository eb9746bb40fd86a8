"""
The store's layout, in one place: key names, the notify channel and its
payloads, and the stored form of a message. chatd's store steps
(:mod:`chatd.store.steps`), its Lua (through the constants that
:func:`lua_constants` writes into the library's prelude), ``chatd-admin``
and the tests all read it from here.

Per destinationId ``D`` (every key carries the hash tag ``{D}``, so that all
of one device's data sits in one Redis Cluster slot and each Lua step
touches one slot):

``chatd:{D}:token``
    SHA-256 of D's current token. Exists = D is registered. Register
    overwrites it, which revokes every older token; ``chatd-admin revoke``
    sets it to ``revoked``. Never expires.
``chatd:{D}:rot``
    Token rotation (a hash, :mod:`chatd.store.lua` ``token.lua``): ``prev``
    the hash of the token presented to get the newest one (valid while the
    newest was never used), ``used`` ``1`` once the newest was used,
    ``retired`` the first 16 bytes (32 hex digits) of the hashes of the last
    :data:`RETIRED_KEPT` tokens that were valid and were then superseded
    (presented again: reuse); after a reuse only ``reused`` ``1`` (the
    tokens were revoked because of one). Absent: nothing rotated yet. A
    register deletes it. Never expires (like ``token``).
``chatd:{D}:seq``
    D's id counter. Never expires, so ids keep increasing for the life of the
    store, across restarts and after the inbox empties. ``send.lua`` reads
    it (with D's ``token`` and ``node``) in one ``MGET`` for its whole batch
    and writes the counters it moved in one ``MSET``; receipts ``INCR`` it.
``chatd:{D}:inbox``
    A list of D's waiting messages, oldest first, each stored as its push line
    (:func:`push_tail`, built by ``send.lua``), so that a push is a copy,
    never a re-encoding. A list rather than a stream: reading it back through
    txredisapi is about 3x faster (flat replies), and ids are kept by the
    counter instead. Only the head is ever removed (acks, expiry), so the
    ids in it are consecutive and the scripts find an id by arithmetic.
    Its expiry (``--inbox-ttl`` after its newest line) is set by
    ``send.lua`` only when the inbox already held messages: an inbox a
    message makes has none at first (while phones ack what they are pushed,
    nearly every message makes an inbox that its ack deletes again, and an
    expiry each was a tenth of the store's cost per message), and the inbox
    sweeper (``inbox_ttl.lua``, :mod:`chatd.store.inboxes`) gives one left
    without an expiry the expiry of its newest line. Messages past the TTL
    are never pushed, expiry or not (``fetch.lua`` drops them).
``chatd:{D}:proof:<hash of a proof ticket>``
    Marks a registration ticket as used, until it expires (a ticket is good
    for one register).
``chatd:{D}:dedup:<hash of text>``
    Marks a text accepted for D within the dedup window (``SET PX``). A key
    per marker rather than a field of one hash per receiver with a field
    expiry (``HSETEX``, Valkey 9): the hash field measured slower per
    marker (and longer in the AOF), see README "Performance".
``chatd:{D}:ref:<hash of sender and ref>``
    The first reply to a (sender, ref) sent to D, for ``--ref-ttl``.
    Scoped to the receiver (the hash tag): a ref reused for another receiver
    is a new send.
``chatd:{D}:node``
    Presence: ``"<node id> <epoch>"`` of the node holding D's connection
    (:mod:`chatd.hub.presence`). Its expiry (``PX``) is a backstop,
    :data:`RECORD_LEASES` node leases, renewed by its node a slice at a
    time; a dead node's records are deleted by a live node (the reaper) once
    that node's heartbeat (``chatd:{nodes}:live:<node id>``) has run out.
``chatd:{D}:since``
    When the connection that holds D (``node``) was opened (ms, the node's
    clock): a claim from a connection opened earlier loses (``claim.lua``),
    so a bind still on its way from a connection the phone has left never
    takes D from its newer one. Never expires (only read while ``node``
    exists).
``chatd:{D}:epoch``
    D's bind counter: every register/reconnect takes the next epoch; the
    highest one holds D. Never expires (like ``seq``).
``chatd:{D}:rcpt``
    Receipts opt-in (contract 1.2): ``1`` while D's last register or
    reconnect carried ``"receipts": "true"``; absent = off. Written at every
    bind, in the step that checks the token (``register.lua``, ``token.lua``). Never expires.
``chatd:{D}:rc:<status>:<R>``
    D's newest receipt for (receiver R, status ``delivered``/``read``):
    ``"<upto> <id> <mark>"``, the upto it said (never goes down), its id in
    D's inbox, and ``<mark>`` D's epoch if it was made while D was bound
    nowhere (never pushed: a newer one replaces it in place while D's epoch
    is unchanged), else ``p``. See ``make_receipt`` in ``_prelude.lua``.
``chatd:{D}:rs``
    Receipt senders of D (the receiver): a hash ``<sender>`` -> the highest
    id of a message from that sender stored in D's inbox while the sender's
    connection had opted in to receipts (written by ``send.lua`` in the
    step that stores it; expires with the inbox). An ack makes delivered
    receipts only for the senders named here with an id in its range (and
    checks their opt-in then, as the contract says); a receiver whose
    ``rs`` names none (nobody who sent to it opted in) is acked as with
    ``--receipts off``, reading no sender's key. Fields the acks covered
    stay (a conversation's sender is not deleted and written again at every
    ack) until ``rs`` names more than 16 senders, then an ack deletes them.
    A sender who opts in later is covered by :data:`RECEIPTS_TURNED`.
``chatd:{D}:outbox``
    Redis Cluster only: receipts made by acks and reads of D (the receiver)
    for senders in other slots, not yet moved into those senders' inboxes. A
    hash ``"<sender> <status>"`` -> ``"<upto> <at ms>"`` (the highest upto),
    written in the ack's (the read's) own atomic step; a node moves each
    field (``receipt.lua``, idempotent) and then deletes it if unchanged
    (``unbox.lua``). Never expires.
``chatd:{D}:push``
    D's push registration (contract 1.2, a hash): ``key`` the pushkey,
    ``app`` the app id, ``ts`` when it was set (unix seconds); and the state
    of its wake-ups: ``last`` (ms) and ``res`` the last wake-up and its
    result, ``bound`` (ms) D's last bind (``claim.lua``), ``lease`` (ms) a
    node's claim on a wake-up in flight, ``cseq`` D's id counter at that
    claim, ``fail`` (ms) and ``tries`` the first failure of a wake-up being
    retried. Absent: no push registration. A register deletes it.
``chatd:rcpt:turned``
    :data:`RECEIPTS_TURNED`, one key per store (one slot on a Cluster): a
    time (ms) up to which stored messages are acked the careful way, every
    sender of them checked for its opt-in as if it had none in ``rs``. Set
    (only ever raised) to now + :data:`TURN_MARGIN_MS` when a device opts
    in at a bind while it had not (its messages sent before are not in any
    ``rs``, and the contract decides by the opt-in at the ack), and when a
    node starts (messages stored by an older release have no ``rs``).
    Absent: nothing to check.
``chatd:pushdue:{T}``
    The due index (:func:`due_key`): a sorted set of destinationIds, scored
    by when (ms) their wake-up may next be claimed. Sharded: D's entry is in
    shard :func:`due_shard` (D's Cluster slot, modulo the shard count) and
    the tag ``T`` of each shard (:func:`shard_tag`) hashes to that very slot,
    so on Redis Cluster (16384 shards) D's index entry lives in D's slot and
    ``send.lua`` writes it in the same atomic step as the message; on one
    store :data:`DUE_SHARDS` shards keep it off any single hot key.
``chatd:{nodes}``
    The nodes (a set of node ids) that have bound devices on this store:
    each adds itself at every heartbeat (``beat.lua``); the reaper removes
    a dead one once its records are gone.
``chatd:{nodes}:live:<node id>``
    A node's heartbeat: written every ``--presence-lease`` / 3 with a lease
    of ``--presence-lease``. Missing = the node is dead (or was cut off from
    the store for a whole lease, see :mod:`chatd.hub.presence`).
``chatd:{nodes}:reaper``
    The node id of the one node that deletes the dead nodes' records now
    (a lease of three node leases, renewed by its heartbeats while it reaps).
``chatd:{D}:notify``
    Not a key: D's sharded pub/sub channel. Its payloads, ASCII:

    ``m <push line>``
        A message was accepted for D (published by ``send.lua``, in the step
        that stores it, only when D's presence names another node). A hint:
        the inbox is the truth.
    ``k <epoch> <node id>``
        D was bound on that node with that epoch (``claim.lua``): a node
        holding D with a lower epoch closes its connection.
    ``revoked``
        The operator revoked D's tokens (``chatd-admin revoke``/``purge``).
"""

import binascii
import hashlib
import json

from chatd.wire.packets import ID_WIDTH

#: key suffixes (after ``chatd:{D}:``)
TOKEN = b"token"
ROTATION = b"rot"
#: retired token hashes kept per device for reuse detection (see ``rot``)
RETIRED_KEPT = 8
SEQ = b"seq"
INBOX = b"inbox"
PROOF = b"proof:"
DEDUP = b"dedup:"
REF = b"ref:"
NODE = b"node"
SINCE = b"since"
EPOCH = b"epoch"
NOTIFY = b"notify"
RECEIPTS = b"rcpt"
RECEIPT_AT = b"rc:"
OUTBOX = b"outbox"
RECEIPT_SENDERS = b"rs"
#: see ``chatd:rcpt:turned`` above; the margin covers the clocks of two
#: nodes (a message's sent_at is its node's clock) and a send in flight
RECEIPTS_TURNED = b"chatd:rcpt:turned"
TURN_MARGIN_MS = 5000
PUSH = b"push"
#: due-index shards on one store, and on Redis Cluster (one per slot: an
#: index entry must live in its device's slot there)
DUE_SHARDS = 16
DUE_SHARDS_CLUSTER = 16384
#: the token value that ``chatd-admin revoke`` writes: no token matches it
REVOKED = b"revoked"


#: the nodes' keys (one hash tag: one Cluster slot, so that ``beat.lua``
#: sees every node's heartbeat in one step)
NODES = b"chatd:{nodes}"
REAPER = NODES + b":reaper"
#: a presence record's expiry, in node leases: only a backstop (the reaper
#: deletes a dead node's records), so long enough that a node renews its
#: records a sixtieth at a time (see chatd.hub.presence)
RECORD_LEASES = 60


def live_key(node_id):
    """A node's heartbeat key (``node_id`` bytes)."""
    return NODES + b":live:" + node_id


def prefix(device):
    """The prefix of D's keys, ``chatd:{D}:``, as bytes."""
    return b"chatd:{%s}:" % device.encode("ascii")


def key(device, suffix):
    return prefix(device) + suffix


def device_of(name, suffix):
    """``chatd:{D}:<suffix>`` (bytes) -> D, or None if it is not of that form."""
    head, tail = b"chatd:{", b"}:" + suffix
    if name.startswith(head) and name.endswith(tail) and len(name) > len(head) + len(tail):
        return name[len(head):-len(tail)].decode("ascii", "replace")
    return None


def pattern(suffix):
    """A SCAN pattern for one kind of key of every device."""
    return "chatd:{*}:" + suffix.decode("ascii")


def slot(device):
    """D's Redis Cluster slot (CRC16 of its hash tag, as the Cluster spec)."""
    return binascii.crc_hqx(device.encode("ascii"), 0) & 16383


_SHARD_TAGS = []


def shard_tag(shard):
    """A short text whose CRC16 slot is ``shard`` (0..16383): the hash tag of
    that due-index shard. The table is made once, on first use."""
    if not _SHARD_TAGS:
        tags = [None] * 16384
        left, n = 16384, 0
        while left:
            text = b"%x" % n
            s = binascii.crc_hqx(text, 0) & 16383
            if tags[s] is None:
                tags[s] = text
                left -= 1
            n += 1
        _SHARD_TAGS.extend(tags)
    return _SHARD_TAGS[shard]


def due_shard(device, shards):
    return slot(device) % shards


def due_key(shard):
    """The key of one due-index shard."""
    return b"chatd:pushdue:{%s}" % shard_tag(shard)


def device_due_key(device, shards):
    return due_key(due_shard(device, shards))


def mask_pushkey(pushkey):
    """A pushkey as logs and chatd-admin show it: never in full."""
    if not pushkey:
        return ""
    if isinstance(pushkey, bytes):
        pushkey = pushkey.decode("utf-8", "replace")
    return "%s…(%d)" % (pushkey[:4], len(pushkey)) if len(pushkey) > 8 else "…(%d)" % len(pushkey)


def channel(device):
    """D's notify channel."""
    return prefix(device) + NOTIFY


def proof_key(device, ticket):
    return prefix(device) + PROOF + hashlib.sha256(ticket.encode("utf-8")).hexdigest().encode()


def dedup_key(device, text_bytes):
    return prefix(device) + DEDUP + hashlib.blake2b(
        text_bytes, digest_size=16).hexdigest().encode()


def ref_key(device, sender, ref):
    return prefix(device) + REF + hashlib.blake2b(
        ("%s\0%r" % (sender, ref)).encode("utf-8"), digest_size=16).hexdigest().encode()


# -- notify payloads --------------------------------------------------------------

def parse_notice(payload):
    """A payload as ``(kind, value)``: ``("m", entry)``, ``("k", (epoch,
    node))``, ``("revoked", None)``; None if it is none of these (a newer
    node's payload: logged and ignored)."""
    if payload == REVOKED:
        return "revoked", None
    kind, _, rest = payload.partition(b" ")
    if kind == b"m" and rest:
        return "m", rest
    if kind == b"k":
        epoch, _, node = rest.partition(b" ")
        if epoch.isdigit():
            return "k", (int(epoch), node.decode("ascii", "replace"))
    return None


# -- the stored message ----------------------------------------------------------

#: a stored message is its push line without the newline:
#: ENTRY_HEAD <id> ENTRY_MID <sent_at> <tail>. ``send.lua`` builds it and
#: returns it; the Lua reads the id back at a fixed offset.
ENTRY_HEAD = b'{"type":"message","id":"'
ENTRY_MID = b'","sent_at":'
#: a stored receipt (contract 1.2) is its push line too, its id at the same
#: place: RECEIPT_HEAD <id> ``","receiver":"R","status":"S","upto":"U","at":ms}``
RECEIPT_HEAD = b'{"type":"receipt","id":"'
assert len(RECEIPT_HEAD) == len(ENTRY_HEAD)
#: where the id is in a stored message (0-based, end excluded)
ID_START = len(ENTRY_HEAD)
ID_END = ID_START + ID_WIDTH
SENT_AT_START = ID_END + len(ENTRY_MID)

_text = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def push_tail(sender, receiver, text):
    """The part of a stored message that follows its sent_at value, as bytes.
    (Ids are destinationIds, whose characters need no JSON escaping.)"""
    return (',"sender":"%s","receiver":"%s","message":%s}' % (
        sender, receiver, _text(text))).encode("utf-8")


def entry_id(entry):
    """The server id (int) of a stored message."""
    return int(entry[ID_START:ID_END])


def entry_id_text(entry):
    """The server id (str) of a stored message."""
    return entry[ID_START:ID_END].decode("ascii")


def is_receipt(entry):
    """Whether a stored line is a receipt (not a message)."""
    return entry.startswith(RECEIPT_HEAD)


def entry_sent_at(entry):
    """When a stored message was accepted (ms since the epoch), or None
    (for a receipt: when it was made)."""
    if entry.startswith(RECEIPT_HEAD):
        digits = entry.rsplit(b":", 1)[-1].rstrip(b"}")
        return int(digits) if digits.isdigit() else None
    digits = entry[SENT_AT_START:SENT_AT_START + 20].split(b",", 1)[0]
    return int(digits) if digits.isdigit() else None


def lua_constants():
    """The constants above that the Lua needs, as Lua source: written at
    the top of the library's prelude (:mod:`chatd.store.library`)."""
    def s(b):
        return '"%s"' % b.decode("ascii").replace("\\", "\\\\").replace('"', '\\"')
    return ("-- from chatd/store/layout.py\n"
            "local ENTRY_HEAD, ENTRY_MID = %s, %s\n"
            "local ID_FIRST, ID_LAST, SENT_AT_FIRST = %d, %d, %d\n"
            "local NOTIFY = %s\n"
            "local RECEIPT_HEAD, KEY_HEAD = %s, %s\n"
            "local K_SEQ, K_INBOX, K_NODE, K_EPOCH = %s, %s, %s, %s\n"
            "local K_RECEIPTS, K_RECEIPT_AT, K_OUTBOX = %s, %s, %s\n"
            "local RECEIPTS_TURNED = %s\n" % (
                s(ENTRY_HEAD), s(ENTRY_MID), ID_START + 1, ID_END, SENT_AT_START + 1,
                s(NOTIFY), s(RECEIPT_HEAD), s(b"chatd:{"), s(SEQ), s(INBOX), s(NODE),
                s(EPOCH), s(RECEIPTS), s(RECEIPT_AT), s(OUTBOX),
                s(RECEIPTS_TURNED))).encode("ascii")
