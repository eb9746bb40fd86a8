"""
What receipts (1.2) add to the ack's store step (``ack.lua``), measured
inside the store: each case fills one receiver's inbox with 16 messages and
acks them in one step, many times over, and reads the store's own time per
``FCALL`` (``INFO commandstats``: the time inside the step, not the network
nor the load generator, so the figures hold on a shared machine better than
end-to-end throughput does). The baseline is the same step with
``--receipts off`` (mode ``0``), measured in the same run, the cases taking
turns (best of ``--repeat``).

Cases: 16 senders (random peers) or one sender (a conversation); receipts
off; on with nobody opted in; on with every sender opted in and bound here;
and on with nobody opted in but acked carefully (the messages were stored
before a sender's opt-in or a node's start, ``chatd:rcpt:turned``: every
sender's opt-in is read, as every ack did before the receiver's ``rs``).
The opted-in senders' messages are named in the receiver's ``rs`` as
``send.lua`` names them (outside the measured step: that is the send's).

Run: ``python -m benchmarks.ack_cost [--rounds 3000] [--repeat 3] [--json FILE]``.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from chatd.redis.embedded import find_server_binary
from chatd.store import layout
from chatd.store.library import Library

PER_ACK = 16
NODE = "bench-node"
#: (name, senders per ack, receipts mode, senders opted in, careful)
CASES = [
    ("random peers, --receipts off", PER_ACK, "0", False, False),
    ("random peers, on, nobody opted in", PER_ACK, "d", False, False),
    ("random peers, on, nobody, careful", PER_ACK, "d", False, True),
    ("random peers, on, all opted in", PER_ACK, "d", True, False),
    ("conversation, --receipts off", 1, "0", False, False),
    ("conversation, on, nobody opted in", 1, "d", False, False),
    ("conversation, on, nobody, careful", 1, "d", False, True),
    ("conversation, on, all opted in", 1, "d", True, False),
]
#: the entries' sent_at
SENT_AT = 1700000000000


def _store(directory):
    sock = os.path.join(directory, "s.sock")
    proc = subprocess.Popen([find_server_binary(), "--port", "0", "--unixsocket", sock,
                             "--save", "", "--appendonly", "no", "--dir", directory],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import valkey
    r = valkey.Valkey(unix_socket_path=sock)
    for _ in range(500):
        try:
            r.ping()
            return proc, r
        except (valkey.ConnectionError, OSError):
            time.sleep(0.01)
    raise RuntimeError("valkey-server did not start")


def _entry(i, sender, receiver):
    return (layout.ENTRY_HEAD + b"%016d" % i + layout.ENTRY_MID + b"%d" % SENT_AT
            + layout.push_tail(sender, receiver, "hello there, a message of a usual size"))


def run_case(r, lib, case, rounds, tag, inboxes=1):
    """The store's us per ack.lua step (each step acks ``inboxes`` inboxes
    of 16 messages: chatd acks every ack of a reactor turn in one step)."""
    name, senders, mode, opted, careful = case
    receivers = ["rcv%s-%d" % (tag, j) for j in range(inboxes)]
    names = ["snd%s-%d" % (tag, k) for k in range(senders)]
    for s in names:
        if opted:
            r.set(layout.key(s, layout.RECEIPTS), b"1")
            r.set(layout.key(s, layout.NODE), NODE + " 1")  # bound on this node
    if careful:
        r.set(layout.RECEIPTS_TURNED, SENT_AT)
    else:
        r.delete(layout.RECEIPTS_TURNED)
    fn = lib.functions["ack"]
    r.config_resetstat()
    next_id = 1
    for _ in range(rounds):
        p = r.pipeline(transaction=False)
        boxes, listed = [], []
        for receiver in receivers:
            boxes.append(layout.key(receiver, layout.INBOX))
            listed.append(layout.key(receiver, layout.RECEIPT_SENDERS))
            p.rpush(boxes[-1], *[_entry(next_id + k, names[k % senders], receiver)
                                   for k in range(PER_ACK)])
            if opted:  # as send.lua names them: each sender's newest id
                p.hset(listed[-1], mapping={names[k % senders]: next_id + k
                                            for k in range(PER_ACK)})
        upto = next_id + PER_ACK - 1
        next_id += PER_ACK
        keys = boxes if mode == "0" else boxes + listed
        p.execute_command("FCALL", fn, len(keys), *keys, *[upto] * inboxes, mode,
                          SENT_AT, NODE, 86400000, "")
        p.execute()
    stats = r.info("commandstats").get("cmdstat_fcall", {})
    for s in names:  # the receipts made: one inbox per sender
        r.delete(layout.key(s, layout.INBOX))
    return stats.get("usec_per_call")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.ack_cost",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3000, help="acks per case and turn")
    p.add_argument("--repeat", type=int, default=3, help="turns (best of)")
    p.add_argument("--inboxes", type=int, default=1,
                   help="inboxes acked in each step (default 1; chatd acks all of a turn in one)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="ackcost-")
    proc, r = _store(directory)
    try:
        lib = Library()
        r.execute_command("FUNCTION", "LOAD", "REPLACE", lib.source)
        best = {}
        for turn in range(a.repeat):
            for i, case in enumerate(CASES):
                us = run_case(r, lib, case, a.rounds, "%d-%d" % (turn, i), a.inboxes)
                best[case[0]] = min(best.get(case[0], us), us)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(directory, ignore_errors=True)
    out = {}
    print("ack.lua, %d ack(s) of %d messages a step: the store's time per step (best of %d x %d)"
          % (a.inboxes, PER_ACK, a.repeat, a.rounds))
    print("%-40s %10s %8s" % ("case", "us/ack", "vs off"))
    for name, *_ in CASES:
        base = best["%s, --receipts off" % name.split(",")[0]]
        out[name] = {"us_per_ack": best[name], "ratio_to_off": best[name] / base}
        print("%-40s %10.2f %7.2fx" % (name, best[name], best[name] / base))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"host": socket.gethostname(), "inboxes_per_step": a.inboxes,
                       "cases": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
