"""
The chaos harness: many clients chat through a real chatd (``twistd -n
chatd`` subprocesses) while faults are injected, then everything is checked.

Run by hand (from the repository root, in the venv)::

    python -m tests.system.chaos --duration 600 --clients 200 --mode embedded
    python -m tests.system.chaos --duration 600 --clients 200 --mode redis --redis-sigkill
    python -m tests.system.chaos --duration 600 --clients 200 --mode nodes --nodes 3
    python -m tests.system.chaos --duration 600 --clients 200 --mode sentinel
    python -m tests.system.chaos --duration 600 --clients 200 --mode cluster

``tests/system/test_chaos.py`` runs a short form of it in CI.

Modes:

``embedded``
    chatd runs its own store (``--data-dir``). chatd is killed with SIGKILL
    (its store child lives on as an orphan; the next chatd stops it cleanly,
    so nothing accepted can be lost) and restarted, or stopped with SIGTERM.
``redis``
    chatd uses ``--redis unix:///...`` to a valkey-server run by the harness
    with ``appendonly yes``. Besides chatd kills, Redis is stopped with
    SIGTERM (it writes its AOF) and started again; with ``--redis-sigkill`` it
    is also killed with SIGKILL, and then runs with ``appendfsync always`` (a
    SIGKILLed store with ``everysec`` may lose its last second of writes,
    which chatd has already acknowledged: that is a configuration choice, not
    a chatd bug).
``sentinel``
    Two chatd nodes (``--nodes``) with ``--store-acks 1`` on a primary, a
    replica and three sentinels (tests/fixtures/sentinel.py). Besides the chatd
    faults: the primary SIGKILLed (the replica takes over; the old primary is
    started again and becomes its replica) and a manual ``SENTINEL
    FAILOVER``; each waits until the sentinels have settled again.
``cluster``
    Two chatd nodes (``--nodes``) with ``--store-acks 1`` on a Valkey Cluster
    of 3 primaries with a replica each (tests/fixtures/cluster.py). Besides the chatd
    faults: a random primary SIGKILLed (its replica takes over after
    cluster-node-timeout; the old one is started again and rejoins as a
    replica) and a replica taking over by hand (``CLUSTER FAILOVER``); each
    waits until the cluster is ok again.
``nodes``
    Several chatd processes (``--nodes``, default 3) on one valkey-server, as
    in ``redis`` mode: one service. Each client connects to a random node
    every time, so a device's reconnect usually lands on another node and its
    messages come from senders on every node. The chatd faults SIGKILL or
    SIGTERM a random node (its clients reconnect to the others meanwhile);
    the store faults are those of ``redis`` mode.

Every client is a device that registers once, then reconnects with its token
after every lost connection. It sends messages with unique texts, always with
a ``ref``, to random other devices; a send that got no reply before its
connection died, or that got ``unavailable``, is sent again with the same
``ref`` until it is answered. It acks what it is pushed, cumulatively, after a
per-device delay. Client-side faults: a connection cut right after a push
arrives (before its ack), a connection cut right after a send (before its
reply), and a client that stops reading for a while.

At the end the harness stops injecting faults and sending, lets every
unanswered send be retried and every accepted message be delivered, and checks:

* lost: an accepted message (receiver, id) never pushed to its receiver: must be 0
* pushed twice on one connection: must be 0
* out of order or a gap on one connection: must be 0
* one connection, one order (contract 1.1): the replies on a connection come
  in the order of its send packets, and of the messages a connection got
  accepted at their first attempt, those to one receiver have ids in send
  order (devices sometimes send a burst of several at once): must be 0
* stored twice (a text pushed under two ids) or a retry answered with another
  id than the message was stored under: must be 0
* no-reply sends: counted; each must end accepted (and delivered with the
  id its retry was given) -- unresolved must be 0
* a message pushed again on a later connection must be the same bytes
* receipts (1.2, tests/system/chaos_receipts.py): three devices in four opt
  in; each receipt reaches an opted-in sender once per connection, its
  ``upto`` never lower than one already seen there, made once, naming a
  message that was sent; and every acked message is covered by a
  ``delivered`` receipt in the end
* nothing is left in any inbox (or receipt outbox) once everything is acked
* no ``Traceback``/``Unhandled`` in chatd's log, and chatd stops cleanly
"""

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

from twisted.protocols.basic import LineReceiver

from tests.fixtures.nodes import ChatdProcess
from tests.fixtures.process import fixed_port
from tests.fixtures.valkey import redis_command
from tests.fixtures.valkey import ValkeyServer
from tests.system.chaos_receipts import ReceiptChecks

CLIENT_FAULTS = ("cut_before_ack", "cut_inflight", "slow_reader")
#: error codes after which a send is retried with the same ref
RETRYABLE = ("unavailable", "rate_limited", "inbox_full")
#: error codes that close a connection
CLOSING = ("line_too_long", "session_replaced", "auth_timeout", "idle_timeout",
           "slow_consumer", "shutdown")
#: most unanswered sends a device keeps before it stops writing new ones
MAX_UNRESOLVED = 40


def default_faults(mode, redis_sigkill=False):
    kinds = ["chatd_sigkill", "chatd_sigterm"]
    if mode in ("sentinel", "cluster"):
        kinds += ["primary_sigkill", "failover"]
    if mode in ("redis", "nodes"):
        kinds.append("redis_sigterm")
        if redis_sigkill:
            kinds.append("redis_sigkill")
    return tuple(kinds) + CLIENT_FAULTS


MODES = ("embedded", "redis", "nodes", "sentinel", "cluster")


@dataclass
class Config:
    mode: str = "embedded"        # or "redis", "nodes", "sentinel"
    nodes: int = 1                # chatd processes (nodes mode: 3 unless given)
    duration: float = 60.0        # seconds of chaos (faults and traffic)
    clients: int = 50
    rate: float = 1.0             # new messages per second per client
    fault_every: float = 5.0      # mean seconds between faults
    faults: tuple = None          # kinds to inject (None: all of the mode)
    redis_sigkill: bool = False   # redis mode: also SIGKILL Redis (appendfsync always)
    down_max: float = 1.0         # longest downtime of a killed chatd (s)
    redis_down_max: float = 4.0   # longest downtime of Redis (s): some outlast --redis-timeout
    pause_max: float = 8.0        # longest pause of a slow reader (s)
    settle: float = 90.0          # deadline of the final drain (s)
    seed: int = None
    workdir: str = None           # default: a fresh temp dir (removed if all is well)
    keep: bool = False            # keep the workdir (logs, data) in any case
    chatd_args: tuple = ()        # more chatd options
    receipts: bool = True         # most devices opt in to receipts (chaos_receipts)
    verbose: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError("mode must be one of %s" % ", ".join(MODES))
        if self.mode == "nodes" and self.nodes < 2:
            self.nodes = 3
        elif self.mode in ("sentinel", "cluster") and self.nodes < 2:
            self.nodes = 2
        elif self.mode not in ("nodes", "sentinel", "cluster"):
            self.nodes = 1
        if self.faults is None:
            self.faults = default_faults(self.mode, self.redis_sigkill)
        if self.seed is None:
            self.seed = random.randrange(1 << 30)
        if "redis_sigkill" in self.faults:
            self.redis_sigkill = True


# -- what happened, and what it means ------------------------------------------------

class Sent:
    """One message a device means to get through (all its attempts)."""

    __slots__ = ("sender", "receiver", "ref", "text", "status", "id", "attempts",
                 "noreply", "errors", "created", "first_sent", "accepted_at")

    def __init__(self, sender, receiver, ref, text, now):
        self.sender = sender
        self.receiver = receiver
        self.ref = ref
        self.text = text
        self.status = "new"     # new, accepted, duplicate, failed
        self.id = None
        self.attempts = 0
        self.noreply = 0        # attempts whose connection died before the reply
        self.errors = []        # error codes of the attempts that got one
        self.created = now
        self.first_sent = None
        self.accepted_at = None


class Tracker:
    """Records what the clients saw; :meth:`report` checks it. No I/O, so the
    checks themselves are tested with made-up events (tests/system/test_chaos.py)."""

    def __init__(self):
        self.sents = []
        self.by_text = {}
        self.attempts = 0
        self.replies = Counter()          # accepted / duplicate / error
        self.send_errors = Counter()      # error code of a send's reply
        self.conn_errors = Counter()      # errors not about a send (ref null)
        self.faults = Counter()
        self.anomalies = Counter()
        self.examples = {}                # anomaly -> first few details
        self.delivered = {}               # (receiver, id) -> push line bytes
        self.text_ids = {}                # text -> set of ids it was pushed under
        self.pushes = 0
        self.repushes = 0                 # pushed again on a later connection
        self.conns = {}                   # serial -> [last id, set of ids]
        self.connections = 0
        self.binds = Counter()            # registered / reconnected
        self.latencies = []               # send -> accepted, first attempts (s)
        self.noreply_at_shutdown = []     # (Sent, ms when its connection got "shutdown")
        self.awaiting = {}                # serial -> refs sent there, unanswered, in order
        self.first_ids = {}               # (serial, receiver) -> [(send position, id)]
        self.positions = {}               # (serial, ref) -> its position among serial's sends
        self.receipts = ReceiptChecks(self.anomaly)

    def anomaly(self, kind, detail=None):
        self.anomalies[kind] += 1
        if detail is not None:
            ex = self.examples.setdefault(kind, [])
            if len(ex) < 5:
                ex.append(detail)

    def new_send(self, sender, receiver, ref, text, now):
        s = Sent(sender, receiver, ref, text, now)
        self.sents.append(s)
        self.by_text[text] = s
        return s

    def attempt(self, s, now, serial=None):
        self.attempts += 1
        s.attempts += 1
        if s.first_sent is None:
            s.first_sent = now
        if serial is not None:
            self.awaiting.setdefault(serial, []).append(s.ref)
            self.positions[(serial, s.ref)] = self.attempts

    def answered(self, serial, s):
        """A reply to s came on connection ``serial``: it must answer the
        oldest send still unanswered there."""
        waiting = self.awaiting.get(serial)
        if not waiting or waiting[0] != s.ref:
            self.anomaly("reply_out_of_packet_order",
                         (s.sender, serial, s.ref, list(waiting or [])[:5]))
        if waiting and s.ref in waiting:
            waiting.remove(s.ref)

    def _check_send_order(self, serial, s, server_id):
        try:
            server_id = int(server_id)
        except (TypeError, ValueError):
            return
        self.first_ids.setdefault((serial, s.receiver), []).append(
            (self.positions.get((serial, s.ref), 0), server_id, s.sender, s.ref))

    def check_send_order(self):
        """Of the messages one connection got accepted at their first
        attempt, those to one receiver must have ids in send order."""
        for (serial, _), got in self.first_ids.items():
            got.sort()
            for (_, a, sender, _), (_, b, _, ref) in zip(got, got[1:]):
                if b <= a:
                    self.anomaly("accepted_out_of_send_order", (sender, serial, ref, a, b))
        self.first_ids = {}

    def accepted(self, s, server_id, now, serial=None):
        self.replies["accepted"] += 1
        if s.id is not None and s.id != server_id:
            self.anomaly("retry_answered_with_another_id", (s.sender, s.ref, s.id, server_id))
        if s.status == "accepted":
            return
        if serial is not None and s.attempts == 1:
            self._check_send_order(serial, s, server_id)
        s.status, s.id, s.accepted_at = "accepted", server_id, now
        if s.attempts == 1 and s.first_sent is not None:
            self.latencies.append(now - s.first_sent)

    def duplicate(self, s):
        # every text is unique, so the dedup rule never applies; a retry of an
        # accepted ref must be answered "accepted" again, never "duplicate"
        self.replies["duplicate"] += 1
        self.anomaly("unexpected_duplicate", (s.sender, s.ref))
        if s.status == "new":
            s.status = "duplicate"

    def send_error(self, s, code, final):
        self.replies["error"] += 1
        self.send_errors[code] += 1
        s.errors.append(code)
        if final and s.status == "new":
            s.status = "failed"
            self.anomaly("send_failed_" + code, (s.sender, s.ref))

    def no_reply(self, s, shutdown_ms=None):
        """An attempt of s got no reply before its connection died; if that
        connection was closed with ``shutdown``, when (wall clock, ms)."""
        s.noreply += 1
        if shutdown_ms is not None:
            self.noreply_at_shutdown.append((s, shutdown_ms))

    def stored_but_unanswered_at_shutdown(self):
        """Sends that chatd had read and stored (their push's sent_at is
        before the client was told ``shutdown``) but never answered: a
        graceful stop must answer everything it has read."""
        out = []
        for s, shutdown_ms in self.noreply_at_shutdown:
            line = self.delivered.get((s.receiver, int(s.id))) if s.status == "accepted" else None
            if line is not None and json.loads(line)["sent_at"] <= shutdown_ms:
                out.append((s.sender, s.ref, s.id))
        return out

    def conn_opened(self):
        self.connections += 1
        serial = self.connections
        self.conns[serial] = [0, set()]
        return serial

    def push(self, device, serial, line, obj):
        """A push on connection ``serial`` of ``device``."""
        self.pushes += 1
        try:
            server_id = int(obj["id"])
            text = obj["message"]
        except (KeyError, TypeError, ValueError):
            self.anomaly("malformed_push", line[:200])
            return
        if not self._in_sequence(device, serial, server_id, line):
            return
        if obj.get("receiver") != device:
            self.anomaly("misrouted", (device, line[:200]))
        self.text_ids.setdefault(text, set()).add(server_id)
        s = self.by_text.get(text)
        if s is None:
            self.anomaly("pushed_but_never_sent", line[:200])
        elif s.sender != obj.get("sender") or s.receiver != device:
            self.anomaly("misrouted", (device, line[:200]))

    def receipt(self, device, serial, line, obj):
        """A receipt (1.2) pushed on connection ``serial`` of ``device``:
        a push in its sequence like a message (see chaos_receipts)."""
        self.pushes += 1
        try:
            server_id = int(obj["id"])
        except (KeyError, TypeError, ValueError):
            self.anomaly("malformed_push", line[:200])
            return
        if self._in_sequence(device, serial, server_id, line):
            self.receipts.push(device, serial, obj)

    def _in_sequence(self, device, serial, server_id, line):
        """Check a push's id on its connection (and its bytes against an
        earlier push of that id): False if it was pushed there before."""
        last, ids = self.conns[serial]
        if server_id in ids:
            self.anomaly("pushed_twice_on_one_connection", (device, serial, server_id))
            return False
        if server_id < last:
            self.anomaly("out_of_order_on_one_connection", (device, serial, last, server_id))
        elif last and server_id != last + 1:
            # the inbox holds consecutive ids (messages and receipts) and
            # pushes follow it: a gap is a push skipped on this connection
            self.anomaly("gap_on_one_connection", (device, serial, last, server_id))
        ids.add(server_id)
        self.conns[serial][0] = max(last, server_id)
        key = (device, server_id)
        first = self.delivered.get(key)
        if first is None:
            self.delivered[key] = line
        else:
            self.repushes += 1
            if first != line:
                self.anomaly("changed_when_pushed_again", (first[:120], line[:120]))
        return True

    def undelivered(self):
        return [s for s in self.sents
                if s.status == "accepted" and (s.receiver, int(s.id)) not in self.delivered]

    def unresolved(self):
        return [s for s in self.sents if s.status == "new"]

    def report(self, **extra):
        self.check_send_order()
        receipts_missing = self.receipts.check(self.sents)
        accepted = [s for s in self.sents if s.status == "accepted"]
        lost = self.undelivered()
        stored_twice = {t: ids for t, ids in self.text_ids.items() if len(ids) > 1}
        mismatch = [s for s in accepted if s.text in self.text_ids
                    and self.text_ids[s.text] != {int(s.id)}]
        noreply = [s for s in self.sents if s.noreply]
        outcomes = Counter()
        for s in noreply:
            if s.status == "accepted":
                delivered = (s.receiver, int(s.id)) in self.delivered
                outcomes["accepted on retry, delivered" if delivered
                         else "accepted on retry, NOT delivered"] += 1
            else:
                outcomes[s.status] += 1
        retried_after_error = sum(1 for s in self.sents if s.errors)
        unanswered_at_shutdown = self.stored_but_unanswered_at_shutdown()
        lat = sorted(self.latencies)

        def pct(p):
            return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else 0.0

        r = Report(
            sent=len(self.sents), attempts=self.attempts,
            accepted=len(accepted),
            failed=sum(1 for s in self.sents if s.status == "failed"),
            duplicates=self.replies["duplicate"],
            send_errors=dict(self.send_errors), conn_errors=dict(self.conn_errors),
            delivered=sum(1 for s in accepted if (s.receiver, int(s.id)) in self.delivered),
            pushes=self.pushes, repushes=self.repushes,
            lost=len(lost),
            lost_examples=[(s.sender, s.receiver, s.ref, s.id) for s in lost[:10]],
            pushed_twice=self.anomalies["pushed_twice_on_one_connection"],
            out_of_order=self.anomalies["out_of_order_on_one_connection"]
            + self.anomalies["gap_on_one_connection"],
            send_order=self.anomalies["reply_out_of_packet_order"]
            + self.anomalies["accepted_out_of_send_order"],
            stored_twice=len(stored_twice), id_mismatch=len(mismatch),
            noreply=len(noreply), noreply_attempts=sum(s.noreply for s in noreply),
            noreply_outcomes=dict(outcomes),
            noreply_at_shutdown=len(self.noreply_at_shutdown),
            unanswered_at_shutdown=len(unanswered_at_shutdown),
            unanswered_examples=unanswered_at_shutdown[:5],
            retried_after_error=retried_after_error,
            unresolved=len(self.unresolved()),
            faults=dict(self.faults), connections=self.connections,
            binds=dict(self.binds),
            anomalies=dict(self.anomalies), examples=dict(self.examples),
            latency=(pct(0.5), pct(0.99), lat[-1] if lat else 0.0),
            receipts=dict(self.receipts.pushes), reads_sent=self.receipts.reads_sent,
            receipts_opted=len(self.receipts.opted), receipts_missing=len(receipts_missing),
        )
        for k, v in extra.items():
            setattr(r, k, v)
        return r


@dataclass
class Report:
    sent: int = 0
    attempts: int = 0
    accepted: int = 0
    failed: int = 0
    duplicates: int = 0
    send_errors: dict = field(default_factory=dict)
    conn_errors: dict = field(default_factory=dict)
    delivered: int = 0
    pushes: int = 0
    repushes: int = 0
    lost: int = 0
    lost_examples: list = field(default_factory=list)
    pushed_twice: int = 0
    out_of_order: int = 0
    send_order: int = 0
    stored_twice: int = 0
    id_mismatch: int = 0
    noreply: int = 0
    noreply_attempts: int = 0
    noreply_outcomes: dict = field(default_factory=dict)
    noreply_at_shutdown: int = 0
    unanswered_at_shutdown: int = 0
    unanswered_examples: list = field(default_factory=list)
    retried_after_error: int = 0
    unresolved: int = 0
    faults: dict = field(default_factory=dict)
    connections: int = 0
    binds: dict = field(default_factory=dict)
    anomalies: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)
    latency: tuple = (0.0, 0.0, 0.0)
    receipts: dict = field(default_factory=dict)  # status -> receipt pushes
    reads_sent: int = 0
    receipts_opted: int = 0       # devices that opted in
    receipts_missing: int = 0     # (sender, receiver) pairs whose receipts fell short
    # filled in by the run
    mode: str = ""
    clients: int = 0
    seed: int = 0
    duration: float = 0.0
    drain: float = 0.0
    appendfsync: str = ""
    left_in_inboxes: int = -1
    log_problems: list = field(default_factory=list)
    clean_stop: bool = True
    workdir: str = ""

    def problems(self):
        """What went wrong; empty when every check passed."""
        out = []
        if self.lost:
            out.append("lost %d accepted messages, e.g. %s" % (self.lost, self.lost_examples[:3]))
        if self.pushed_twice:
            out.append("%d pushes repeated on one connection" % self.pushed_twice)
        if self.out_of_order:
            out.append("%d out-of-order pushes or gaps on one connection" % self.out_of_order)
        if self.stored_twice:
            out.append("%d texts stored under two ids" % self.stored_twice)
        if self.id_mismatch:
            out.append("%d messages pushed under another id than accepted" % self.id_mismatch)
        if self.unresolved:
            out.append("%d sends never answered" % self.unresolved)
        if self.unanswered_at_shutdown:
            out.append("%d sends stored by a stopping chatd but not answered before its "
                       "'shutdown' (a graceful stop must answer what it has read), e.g. %s"
                       % (self.unanswered_at_shutdown, self.unanswered_examples[:3]))
        if self.failed:
            out.append("%d sends refused for good: %s" % (self.failed, self.send_errors))
        for kind, n in sorted(self.anomalies.items()):
            if not kind.startswith("send_failed_") \
                    and kind not in ("pushed_twice_on_one_connection",
                                     "out_of_order_on_one_connection",
                                     "gap_on_one_connection"):
                out.append("%s: %d, e.g. %s" % (kind, n, self.examples.get(kind, [])[:2]))
        if self.left_in_inboxes > 0:
            out.append("%d messages or receipts left in inboxes (or outboxes) after every "
                       "push was acked"
                       % self.left_in_inboxes)
        if self.log_problems:
            out.append("chatd logged %d traceback lines, e.g. %s"
                       % (len(self.log_problems), self.log_problems[:3]))
        if not self.clean_stop:
            out.append("chatd did not stop cleanly on SIGTERM")
        return out

    def format(self):
        faults = ", ".join("%s %d" % kv for kv in sorted(self.faults.items())) or "none"

        def codes(d):
            return ", ".join("%s %d" % kv for kv in sorted(d.items())) or "none"

        lines = [
            "chaos run: mode %s%s, %d clients, %.0fs of chaos + %.1fs drain, seed %d"
            % (self.mode, " (appendfsync %s)" % self.appendfsync if self.appendfsync else "",
               self.clients, self.duration, self.drain, self.seed),
            "  faults injected:        %s" % faults,
            "  connections:            %d (%s)" % (self.connections, codes(self.binds)),
            "  messages sent:          %d (%d send packets, retries included)"
            % (self.sent, self.attempts),
            "  accepted:               %d" % self.accepted,
            "  rejected with an error: %s (replies; %d sends retried after one)"
            % (codes(self.send_errors), self.retried_after_error),
            "  refused for good:       %d" % self.failed,
            "  duplicate replies:      %d" % self.duplicates,
            "  delivered:              %d (%d pushes, %d again on a later connection)"
            % (self.delivered, self.pushes, self.repushes),
            "  LOST:                   %d" % self.lost,
            "  pushed twice on one connection: %d" % self.pushed_twice,
            "  out of order / gaps on one connection: %d" % self.out_of_order,
            "  replies or ids out of send order on one connection: %d" % self.send_order,
            "  stored twice: %d, pushed under another id than accepted: %d"
            % (self.stored_twice, self.id_mismatch),
            "  no-reply sends:         %d (%d attempts); outcome: %s"
            % (self.noreply, self.noreply_attempts, codes(self.noreply_outcomes)),
            "    of which at a SIGTERM: %d; stored by the stopping chatd yet unanswered: %d"
            % (self.noreply_at_shutdown, self.unanswered_at_shutdown),
            "  unresolved sends:       %d" % self.unresolved,
            "  receipts (%d devices opted in): pushed %s; %d reads sent; MISSING: %d pairs"
            % (self.receipts_opted, codes(self.receipts), self.reads_sent,
               self.receipts_missing),
            "  errors closing/other:   %s" % codes(self.conn_errors),
            "  accept latency:         p50 %.1f ms, p99 %.1f ms, max %.1f ms"
            % tuple(x * 1000 for x in self.latency),
            "  left in in-/outboxes:   %s" % (self.left_in_inboxes if self.left_in_inboxes >= 0
                                              else "not checked"),
            "  chatd log:              %s" % ("clean" if not self.log_problems
                                              else "%d bad lines" % len(self.log_problems)),
        ]
        if self.anomalies:
            lines.append("  anomalies:              %s" % codes(self.anomalies))
        problems = self.problems()
        lines.append("  RESULT:                 %s" % ("OK" if not problems else "FAILED"))
        lines += ["    - " + p for p in problems]
        if self.workdir:
            lines.append("  logs and data in %s" % self.workdir)
        return "\n".join(lines)


# -- the clients ------------------------------------------------------------------------

class _Conn(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 1 << 24

    def __init__(self, device, serial):
        self.device = device
        self.serial = serial
        self.bound = False
        self.dead = False         # cut by the harness: what arrives now is not seen
        self.outstanding = {}     # ref -> Sent, sent here and not answered yet
        self.last_push = 0
        self.acked = 0
        self.last_from = {}       # sender -> its last message pushed here (for read)
        self.bind_call = None
        self.shutdown_ms = None   # when chatd said "shutdown" (wall clock, ms)

    def connectionMade(self):
        self.device.made(self)

    def lineReceived(self, line):
        if self.dead:
            return
        try:
            self.device.line(self, line)
        except Exception:
            self.device.h.harness_error()

    def connectionLost(self, reason):
        try:
            self.device.lost(self)
        except Exception:
            self.device.h.harness_error()

    def send(self, obj):
        self.sendLine(json.dumps(obj, ensure_ascii=False).encode("utf-8"))

    def cut(self):
        self.dead = True
        self.transport.abortConnection()


class Device:
    """One simulated phone: connects, binds, sends, acks, reconnects."""

    def __init__(self, h, name, receipts=False):
        self.h = h
        self.name = name
        self.receipts = receipts  # opts in to receipts (1.2) on every bind
        if receipts:
            h.tracker.receipts.opted.add(name)
        self.rng = random.Random(h.rng.random())
        self.token = None
        self.conn = None
        self.connecting = None
        self.reconnect_call = None
        self.backoff = 0.05
        self.seq = 0
        self.unresolved = {}      # ref -> Sent: not accepted yet (insertion order)
        self.retry = {}           # ref -> Sent to send again once bound / due
        self.retry_at = 0.0
        self.next_send = 0.0
        self.next_ack = 0.0
        self.ack_interval = self.rng.choice((0.05, 0.2, 0.5, 1.5))
        self.cut_on_push = False
        self.paused = False

    # connection life

    def connect(self):
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        self.reconnect_call = None
        if self.h.stopping:
            return
        conn = _Conn(self, None)
        d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.h.pick_port(self.rng), timeout=5), conn)
        self.connecting = d

        def failed(f):
            self.connecting = None
            if not self.h.stopping:
                self.schedule_reconnect()

        d.addCallbacks(lambda _: None, failed)

    def schedule_reconnect(self):
        from twisted.internet import reactor
        if self.h.stopping or self.reconnect_call is not None:
            return
        delay = self.rng.uniform(0.5, 1.0) * self.backoff
        self.backoff = min(self.backoff * 2, 1.0)
        self.reconnect_call = reactor.callLater(delay, self.connect)

    def made(self, conn):
        self.connecting = None
        conn.serial = self.h.tracker.conn_opened()
        self.conn = conn
        self.paused = False
        self.cut_on_push = False
        if self.h.stopping:
            conn.transport.abortConnection()
            return
        self.bind(conn)

    def bind(self, conn):
        conn.bind_call = None
        if conn.dead or conn is not self.conn:
            return
        opt_in = {"receipts": "true"} if self.receipts else {}
        if self.token is None:
            conn.send({"register": "true", "sender": self.name, **opt_in})
        else:
            conn.send({"reconnect": "true", "sender": self.name, "token": self.token, **opt_in})

    def lost(self, conn):
        if conn.bind_call is not None and conn.bind_call.active():
            conn.bind_call.cancel()
        for s in conn.outstanding.values():
            self.h.tracker.no_reply(s, conn.shutdown_ms)
            self.retry[s.ref] = s
        conn.outstanding.clear()
        if conn is self.conn:
            self.conn = None
            self.paused = False
            self.schedule_reconnect()

    # input

    def line(self, conn, raw):
        h, t = self.h, self.h.tracker
        try:
            obj = json.loads(raw)
            kind = obj["type"]
        except (ValueError, KeyError, TypeError):
            t.anomaly("bad_server_line", raw[:200])
            return
        if kind == "message":
            if not conn.bound:
                t.anomaly("push_before_bind_reply", (self.name, raw[:120]))
            t.push(self.name, conn.serial, raw, obj)
            self.pushed(conn, obj)
            if isinstance(obj.get("sender"), str):
                conn.last_from[obj["sender"]] = obj.get("id")
            if self.cut_on_push:
                self.cut_on_push = False
                t.faults["cut_before_ack"] += 1
                conn.cut()
        elif kind == "receipt":
            if not conn.bound:
                t.anomaly("push_before_bind_reply", (self.name, raw[:120]))
            t.receipt(self.name, conn.serial, raw, obj)
            self.pushed(conn, obj)
        elif kind in ("accepted", "duplicate"):
            s = conn.outstanding.pop(obj.get("ref"), None)
            if s is None:
                t.anomaly("reply_to_unknown_ref", raw[:200])
                return
            t.answered(conn.serial, s)
            if obj.get("receiver") != s.receiver:
                t.anomaly("reply_names_another_receiver", raw[:200])
            if kind == "accepted":
                t.accepted(s, obj.get("id"), h.now(), conn.serial)
                self.unresolved.pop(s.ref, None)
            else:
                t.duplicate(s)
                self.unresolved.pop(s.ref, None)
        elif kind == "error":
            code = obj.get("code")
            ref = obj.get("ref")
            s = conn.outstanding.pop(ref, None) if ref is not None else None
            if s is not None:
                t.answered(conn.serial, s)
                final = code not in RETRYABLE
                t.send_error(s, code, final)
                if final:
                    self.unresolved.pop(s.ref, None)
                else:
                    self.retry[s.ref] = s
                    self.retry_at = h.now() + self.rng.uniform(0.2, 1.0)
                return
            t.conn_errors[code] += 1
            if code == "revoked" or "used elsewhere with an old token" in obj.get("reason", ""):
                # no operator revokes here, and every token is kept as given:
                # a reuse found here would log a real user out
                t.anomaly("false_token_reuse", self.name)
            if code == "shutdown":
                conn.shutdown_ms = time.time() * 1000
            if code in CLOSING:
                return
            if not conn.bound:
                if code == "bad_token":
                    t.anomaly("bad_token_on_reconnect", self.name)
                # the store was unreachable (or we were too fast): bind again soon
                from twisted.internet import reactor
                conn.bind_call = reactor.callLater(self.rng.uniform(0.2, 0.6), self.bind, conn)
            elif code == "unavailable":
                conn.acked = 0  # an ack was not stored: ack again
            else:
                t.anomaly("unexpected_error_" + str(code), raw[:200])
        elif kind in ("registered", "reconnected"):
            if obj.get("sender") != self.name:
                t.anomaly("bound_as_another_id", raw[:200])
            if kind == "registered" or obj.get("token"):
                # a reconnect's next token (rotation, 1.2) is kept at once,
                # like a real client's; a reply lost with its connection
                # leaves the old one, which stays valid (the grace)
                self.token = obj["token"]
            conn.bound = True
            t.binds[kind] += 1
            self.backoff = 0.05
            # everything not answered yet goes again, same ref, oldest first
            self.retry = dict(self.unresolved)
            self.retry_at = 0.0
        elif kind == "ping":
            conn.send({"ping": "keepalive"})
        elif kind == "pong":
            pass
        else:
            t.anomaly("unknown_line_type", raw[:200])

    @staticmethod
    def pushed(conn, obj):
        try:
            conn.last_push = max(conn.last_push, int(obj["id"]))
        except (KeyError, TypeError, ValueError):
            pass

    # output, driven by the harness's tick

    def tick(self, now):
        c = self.conn
        if c is None or not c.bound or c.dead:
            return
        if self.retry and now >= self.retry_at:
            for s in list(self.retry.values()):
                if s.ref not in c.outstanding and s.status == "new":
                    self.send(c, s, now)
            self.retry.clear()
        if self.h.sending and now >= self.next_send:
            self.next_send = now + self.rng.expovariate(self.h.cfg.rate)
            # now and then a burst: several messages to one receiver at once
            burst = self.rng.randint(2, 5) if self.rng.random() < 0.2 else 1
            receiver = self.h.pick_receiver(self)
            for _ in range(burst):
                if len(self.unresolved) < MAX_UNRESOLVED:
                    self.send(c, self.new_message(now, receiver), now)
        if now >= self.next_ack and c.last_push > c.acked:
            c.send({"ack": "%016d" % c.last_push})
            c.acked = c.last_push
            self.next_ack = now + self.ack_interval
            if c.last_from and self.rng.random() < 0.3:
                # the conversation with one sender was on screen: read (1.2)
                sender = self.rng.choice(sorted(c.last_from))
                c.send({"read": c.last_from.pop(sender), "from": sender})
                self.h.tracker.receipts.reads_sent += 1

    def new_message(self, now, receiver):
        self.seq += 1
        ref = self.seq if self.seq % 5 == 0 else "r%d" % self.seq
        text = "%s>%s #%d %08x" % (self.name, receiver, self.seq, self.rng.getrandbits(32))
        extra = self.rng.random()
        if extra < 0.05:
            text += " ünï ✓ \"q\" 'x' \\ 😀"
        elif extra < 0.08:
            text += " " + "." * self.rng.randrange(100, 6000)
        s = self.h.tracker.new_send(self.name, receiver, ref, text, now)
        self.unresolved[ref] = s
        return s

    def send(self, c, s, now):
        self.h.tracker.attempt(s, now, c.serial)
        c.outstanding[s.ref] = s
        c.send({"message": s.text, "receiver": s.receiver, "ref": s.ref})


# -- the processes ----------------------------------------------------------------------

class Servers:
    """chatd (nodes mode: several) and in redis and nodes mode its
    valkey-server, started, killed, restarted."""

    def __init__(self, cfg, workdir):
        self.cfg = cfg
        self.workdir = workdir
        self.ports = [fixed_port() for _ in range(cfg.nodes)]
        args = list(cfg.chatd_args)
        self.valkey = None
        self.sentinels = None
        self.cluster = None
        if cfg.mode == "cluster":
            from tests.fixtures.cluster import ValkeyCluster
            self.cluster = ValkeyCluster(os.path.join(workdir, "stores"))
            args += ["--redis", self.cluster.url, "--store-acks", "1"]
        elif cfg.mode == "sentinel":
            from tests.fixtures.sentinel import SentinelSet
            self.sentinels = SentinelSet(os.path.join(workdir, "stores"))
            args += ["--redis", self.sentinels.url(), "--store-acks", "1",
                     "--redis-timeout", "1s"]
        elif cfg.mode in ("redis", "nodes"):
            vdir = os.path.join(workdir, "redis")
            os.makedirs(vdir, exist_ok=True)
            self.valkey = ValkeyServer(vdir, appendfsync="always" if cfg.redis_sigkill
                                       else "everysec")
            args += ["--redis", self.valkey.url]
            self.store_socket = self.valkey.path
        else:
            args += ["--data-dir", os.path.join(workdir, "data")]
            self.store_socket = os.path.join(workdir, "data", "valkey.sock")
        self.chatds = [ChatdProcess(workdir, ["--port", "tcp:%d:interface=127.0.0.1" % port]
                                    + args, log_path=os.path.join(
                                        workdir, "chatd.log" if i == 0 else "chatd%d.log" % i))
                       for i, port in enumerate(self.ports)]

    @property
    def port(self):
        return self.ports[0]

    @property
    def chatd(self):
        return self.chatds[0]

    def store(self, *args):
        if self.sentinels is not None:
            return self.sentinels.command(*args)
        return redis_command(self.store_socket, *args)

    def inbox_total(self):
        """Messages and receipts left in every inbox, and receipts in every
        outbox (of every primary, on a cluster)."""
        stores = [self.store] if self.cluster is None else \
            [n.command for n in self.cluster.masters()]
        return sum(command(length, k) for command in stores
                   for pattern, length in (("chatd:*:inbox", "LLEN"), ("chatd:*:outbox", "HLEN"))
                   for k in command("KEYS", pattern))

    async def start(self):
        if self.cluster is not None:
            self.cluster.start()
        if self.sentinels is not None:
            self.sentinels.start()
        if self.valkey is not None:
            self.valkey.start()
            await self.valkey.await_ready()
        for chatd in self.chatds:
            chatd.start()
        for chatd in self.chatds:
            await chatd.await_listening()

    async def restart_chatd(self, sig, down, index=0):
        from twisted.internet import reactor, task
        chatd = self.chatds[index]
        if sig == signal.SIGKILL:
            chatd.send_signal(sig)
            await chatd.await_exit(10)
        else:
            await chatd.await_stop(30)
        await task.deferLater(reactor, down, lambda: None)
        chatd.start()
        await chatd.await_listening()

    async def restart_redis(self, sig, down):
        from twisted.internet import reactor, task
        self.valkey.send_signal(sig)
        await self.valkey.await_exit(30)
        await task.deferLater(reactor, down, lambda: None)
        self.valkey.start()
        await self.valkey.await_ready()

    async def move_cluster_primary(self, rng, kill):
        """Cluster mode: SIGKILL a random primary (its replica takes over
        after cluster-node-timeout; the old one is started again and rejoins
        as a replica) or have a replica take over by hand (CLUSTER FAILOVER,
        coordinated: nothing is lost); back once the cluster is ok again."""
        from tests.helpers import wait_until
        c = self.cluster
        old = rng.choice(c.masters())
        replica = c.replica_of(old)
        if kill:
            old.kill()
        else:
            replica.command("CLUSTER", "FAILOVER")
        await wait_until(lambda: replica in c.masters(), 60, "the replica taking over", 0.1)
        if kill:
            old.start()
        await wait_until(c.ok, 90, "the cluster ok again", 0.2)

    async def move_primary(self, kill):
        """Sentinel mode: SIGKILL the primary (its replica takes over; the
        old one is started again and made a replica) or have the sentinels
        fail over by hand; back once everything is settled again."""
        from tests.fixtures.sentinel import info
        from tests.helpers import wait_until
        s = self.sentinels
        old = s.primary()
        if kill:
            old.kill()
            await wait_until(lambda: s.primary() is not old, 120, "a new primary", 0.1)
        else:
            await s.fail_over()
        if kill:
            old.start()
        new = s.primary()
        try:
            await wait_until(lambda: s.settled(new), 60, "the sentinels settled", 0.2)
        except AssertionError:
            # Twice under the whole suite's load (-n 4 on 2 cores) the
            # sentinels left the old primary a primary of nothing for over
            # 90 and 180 s (a sentinel whose timer runs late enters TILT
            # mode, in which it does nothing for 30 s at a time). chatd is
            # not what this waits for: do what an operator would, and make
            # the old primary a replica of the new one.
            for o in s.servers:
                if o is not new and o.running and o.ready():
                    try:
                        if info(o.port, "replication").get("role") == "master":
                            o.command("REPLICAOF", "127.0.0.1", str(new.port))
                    except (OSError, ConnectionError, RuntimeError):
                        pass
            await wait_until(lambda: s.settled(new), 120, "the sentinels settled", 0.2)

    async def stop(self):
        """A clean stop at the end: True if every chatd exited cleanly on SIGTERM."""
        ok = True
        for chatd in self.chatds:
            code = await chatd.await_stop(30)
            ok = ok and code in (0, -signal.SIGTERM) and "Server Shut Down" in chatd.log(True)
        if self.valkey is not None:
            self.valkey.stop()
        return ok

    def bad_log_lines(self):
        return [line for chatd in self.chatds for line in chatd.bad_log_lines()]

    def cleanup(self):
        for chatd in self.chatds:
            chatd.cleanup()
        if self.valkey is not None:
            self.valkey.cleanup()
        if self.sentinels is not None:
            self.sentinels.cleanup()
        if self.cluster is not None:
            self.cluster.cleanup()


# -- the run ----------------------------------------------------------------------------

class Harness:

    def __init__(self, cfg, servers, log=None):
        self.cfg = cfg
        self.servers = servers
        self.rng = random.Random(cfg.seed)
        self.tracker = Tracker()
        # three devices in four opt in to receipts (1.2); the others must
        # never see one
        self.devices = [Device(self, "c%04d" % i, receipts=cfg.receipts and i % 4 != 3)
                        for i in range(cfg.clients)]
        self.stopping = False
        self.sending = False
        self.ticker = None
        self.background = []
        self.log = log or (lambda msg: None)
        self.errors = []

    @property
    def port(self):
        return self.servers.port

    def pick_port(self, rng):
        """Where a client connects: a random node (the only one but in nodes mode)."""
        return rng.choice(self.servers.ports)

    @staticmethod
    def now():
        return time.monotonic()

    def harness_error(self):
        self.errors.append(traceback.format_exc())
        self.tracker.anomaly("harness_error", self.errors[-1].splitlines()[-1])

    def pick_receiver(self, device):
        while True:
            other = self.rng.choice(self.devices)
            if other is not device:
                return other.name

    def bound_count(self):
        return sum(1 for d in self.devices if d.conn is not None and d.conn.bound)

    def _tick(self):
        now = self.now()
        for d in self.devices:
            try:
                d.tick(now)
            except Exception:
                self.harness_error()

    async def connect_all(self, timeout=60):
        from tests.helpers import wait_until
        for d in self.devices:
            d.connect()
        await wait_until(lambda: self.bound_count() == len(self.devices), timeout,
                        "every client registered")

    def start_ticking(self):
        from twisted.internet import task
        self.ticker = task.LoopingCall(self._tick)
        self.ticker.start(0.02, now=False)

    # faults

    def _bound_devices(self):
        return [d for d in self.devices if d.conn is not None and d.conn.bound
                and not d.conn.dead and not d.paused and not d.cut_on_push]

    async def fault(self, kind):
        from twisted.internet import defer, reactor, task
        cfg, t = self.cfg, self.tracker
        if kind == "chatd_sigkill":
            await self.servers.restart_chatd(signal.SIGKILL, self.rng.uniform(0, cfg.down_max),
                                             self.rng.randrange(cfg.nodes))
        elif kind == "chatd_sigterm":
            await self.servers.restart_chatd(signal.SIGTERM, self.rng.uniform(0, cfg.down_max),
                                             self.rng.randrange(cfg.nodes))
        elif kind == "redis_sigterm":
            await self.servers.restart_redis(signal.SIGTERM,
                                             self.rng.uniform(0, cfg.redis_down_max))
        elif kind == "redis_sigkill":
            await self.servers.restart_redis(signal.SIGKILL,
                                             self.rng.uniform(0, cfg.redis_down_max))
        elif kind in ("primary_sigkill", "failover") and cfg.mode == "cluster":
            await self.servers.move_cluster_primary(self.rng, kill=kind == "primary_sigkill")
        elif kind in ("primary_sigkill", "failover"):
            await self.servers.move_primary(kill=kind == "primary_sigkill")
        elif kind in CLIENT_FAULTS:
            candidates = self._bound_devices()
            if not candidates:
                t.anomaly("fault_skipped_no_client", kind)
                return
            d = self.rng.choice(candidates)
            if kind == "cut_before_ack":
                d.cut_on_push = True  # counted when it happens (on the next push)
                return
            if kind == "cut_inflight":
                c = d.conn
                d.send(c, d.new_message(self.now(), self.pick_receiver(d)), self.now())
                # the first cut of a run comes before any reply can (so every
                # run has a send that got no reply); later ones at random
                delay = 0 if not t.faults["cut_inflight"] else \
                    self.rng.choice((0, 0, 0.001, 0.005, 0.02))
                if delay:
                    await task.deferLater(reactor, delay, lambda: None)
                if not c.dead and c.transport is not None and c.transport.connected:
                    c.cut()
            elif kind == "slow_reader":
                c = d.conn
                c.transport.pauseProducing()
                d.paused = True

                async def resume():
                    await task.deferLater(reactor, self.rng.uniform(1, cfg.pause_max),
                                          lambda: None)
                    if c is d.conn and not c.dead and c.transport.connected:
                        c.transport.resumeProducing()
                    d.paused = False

                self.background.append(defer.ensureDeferred(resume()))
        else:
            raise ValueError("unknown fault %r" % kind)
        if kind != "cut_before_ack":
            t.faults[kind] += 1
        self.log("fault: %s" % kind)

    async def chaos(self, duration):
        from twisted.internet import reactor, task
        end = self.now() + duration
        # past ``duration`` (by up to as long again, a minute at most) the
        # run goes on with the kinds of fault that have not happened yet: a
        # slow or busy machine fits fewer faults in the same time (each
        # restart takes longer, a cut_before_ack waits for a push), and the
        # tests want every kind
        last = end + min(duration, 60)
        order = []
        while True:
            gap = self.rng.uniform(0.3, 1.7) * self.cfg.fault_every
            missing = [k for k in self.cfg.faults if not self.tracker.faults[k]]
            if self.now() + gap >= (last if missing else end):
                break
            await task.deferLater(reactor, gap, lambda: None)
            if not self.cfg.faults:
                continue
            if self.now() >= end:
                await self.fault(self.rng.choice(missing))
                continue
            if not order:
                order = list(self.cfg.faults)
                self.rng.shuffle(order)
            await self.fault(order.pop())
        remaining = end - self.now()
        if remaining > 0:
            await task.deferLater(reactor, remaining, lambda: None)

    async def drain(self, timeout):
        """No new faults or messages: every send answered, every accepted
        message delivered, every push acked."""
        from twisted.internet import defer

        from tests.helpers import wait_until
        self.sending = False
        for d in self.devices:
            d.cut_on_push = False
        if self.background:
            await defer.DeferredList(self.background)
        end = self.now() + timeout
        t = self.tracker

        def left():
            return max(1.0, end - self.now())

        try:
            await wait_until(lambda: self.bound_count() == len(self.devices), left(),
                            "every client bound again", 0.1)
            await wait_until(lambda: not t.unresolved(), left(), "every send answered", 0.1)
            await wait_until(lambda: not t.undelivered(), left(),
                            "every accepted message delivered", 0.1)
            await wait_until(self.all_acked, left(), "every push acked", 0.1)
            # the last acks made receipts (pushes too): those, then their acks
            await wait_until(lambda: not t.receipts.missing(t.sents), left(),
                             "every receipt made and pushed", 0.1)
            await wait_until(self.all_acked, left(), "every receipt acked", 0.1)
        except AssertionError as e:
            self.log("drain: %s" % e)

    def all_acked(self):
        return all(d.conn is not None and d.conn.acked >= d.conn.last_push
                   for d in self.devices)

    def inbox_total(self):
        return self.servers.inbox_total()

    async def close_all(self):
        from tests.helpers import wait_until
        self.stopping = True
        if self.ticker is not None and self.ticker.running:
            self.ticker.stop()
        for d in self.devices:
            if d.reconnect_call is not None and d.reconnect_call.active():
                d.reconnect_call.cancel()
            d.reconnect_call = None
            if d.connecting is not None:
                d.connecting.cancel()
            c = d.conn
            if c is not None:
                if c.bind_call is not None and c.bind_call.active():
                    c.bind_call.cancel()
                if c.transport is not None and c.transport.connected:
                    c.dead = True
                    c.transport.abortConnection()
        await wait_until(lambda: all(d.conn is None and d.connecting is None
                                    for d in self.devices), 10, "every client closed")


async def run(cfg, log=None):
    """One chaos run; returns its :class:`Report` (see ``problems()``)."""
    log = log or (lambda msg: None)
    own_dir = cfg.workdir is None
    workdir = cfg.workdir or tempfile.mkdtemp(prefix="chaos-")
    os.makedirs(workdir, exist_ok=True)
    servers = Servers(cfg, workdir)
    h = Harness(cfg, servers, log)
    report = None
    try:
        await servers.start()
        log("chatd on port(s) %s (%s mode), workdir %s"
            % (",".join(map(str, servers.ports)), cfg.mode, workdir))
        await h.connect_all()
        log("%d clients registered" % len(h.devices))
        h.sending = True
        h.start_ticking()
        t0 = h.now()
        await h.chaos(cfg.duration)
        chaos_time = h.now() - t0
        log("chaos over after %.1fs; draining" % chaos_time)
        t1 = h.now()
        await h.drain(cfg.settle)
        drain_time = h.now() - t1
        left = -1
        try:
            from tests.helpers import wait_until
            await wait_until(lambda: h.inbox_total() == 0, 15, "inboxes empty", 0.2)
            left = 0
        except AssertionError:
            left = h.inbox_total()
        await h.close_all()
        clean = await servers.stop()
        report = h.tracker.report(
            mode=cfg.mode if cfg.nodes == 1 else "%s (%d chatd)" % (cfg.mode, cfg.nodes),
            clients=cfg.clients, seed=cfg.seed, duration=chaos_time,
            drain=drain_time, left_in_inboxes=left, clean_stop=clean,
            appendfsync=servers.valkey.appendfsync if servers.valkey else "",
            log_problems=servers.bad_log_lines())
        return report
    finally:
        if not h.stopping:
            try:
                await h.close_all()
            except Exception:
                pass
        servers.cleanup()
        keep = cfg.keep or report is None or bool(report.problems())
        if report is not None:
            report.workdir = workdir if keep else ""
            if keep:
                with open(os.path.join(workdir, "report.txt"), "w") as f:
                    f.write(report.format() + "\n")
        if own_dir and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif report is None:
            log("logs and data kept in %s" % workdir)


# -- by hand ----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tests.system.chaos",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, default="embedded")
    p.add_argument("--nodes", type=int, default=3, help="nodes and sentinel mode: chatd processes (default 3)")
    p.add_argument("--duration", type=float, default=60, help="seconds of chaos (default 60)")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--rate", type=float, default=1.0,
                   help="new messages per second per client (default 1)")
    p.add_argument("--fault-every", type=float, default=5.0,
                   help="mean seconds between faults (default 5)")
    p.add_argument("--faults", default=None,
                   help="comma-separated kinds (default: all of the mode): chatd_sigkill, "
                   "chatd_sigterm, redis_sigterm, redis_sigkill, " + ", ".join(CLIENT_FAULTS))
    p.add_argument("--redis-sigkill", action="store_true",
                   help="redis mode: also SIGKILL Redis (it then runs with appendfsync always)")
    p.add_argument("--down-max", type=float, default=1.0,
                   help="longest downtime of a killed chatd (s, default 1)")
    p.add_argument("--redis-down-max", type=float, default=4.0,
                   help="longest downtime of Redis (s, default 4)")
    p.add_argument("--pause-max", type=float, default=8.0)
    p.add_argument("--settle", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true", help="keep logs and data")
    p.add_argument("--chatd-arg", action="append", default=[],
                   help="one more chatd option (repeatable), e.g. --chatd-arg=--rate-limit=0")
    p.add_argument("--no-receipts", action="store_true",
                   help="no device opts in to receipts (by default three in four do)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    cfg = Config(mode=a.mode, nodes=a.nodes, duration=a.duration, clients=a.clients, rate=a.rate,
                 fault_every=a.fault_every,
                 faults=tuple(a.faults.split(",")) if a.faults else None,
                 redis_sigkill=a.redis_sigkill, down_max=a.down_max,
                 redis_down_max=a.redis_down_max, pause_max=a.pause_max,
                 settle=a.settle, seed=a.seed, workdir=a.workdir, keep=a.keep,
                 chatd_args=tuple(a.chatd_arg), receipts=not a.no_receipts,
                 verbose=a.verbose)
    start = time.monotonic()

    def log(msg):
        if a.verbose:
            print("[%7.1fs] %s" % (time.monotonic() - start, msg), flush=True)

    from twisted.internet import defer, reactor
    result = {}

    async def go():
        try:
            result["report"] = await run(cfg, log)
        finally:
            reactor.stop()

    def failed(f):
        result["failure"] = f

    reactor.callWhenRunning(lambda: defer.ensureDeferred(go()).addErrback(failed))
    reactor.run()
    if "failure" in result:
        print("the chaos run itself failed:", file=sys.stderr)
        result["failure"].printTraceback(file=sys.stderr)
        return 2
    report = result["report"]
    print(report.format())
    return 1 if report.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
