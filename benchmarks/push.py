"""
What push wake-ups cost (issue 20): sends to receivers that are all offline
with a push registration, the gateway answering at once, against the same
run with ``--push-url`` unset. Same machine, same run, the two variants
taking turns.

   python -m benchmarks.push [--receivers 1000] [--senders 20] [--window 50]
                             [--duration 10] [--warmup 2] [--repeat 2]

The generator is this process (blocking sockets and ``selectors``): each
sender connection keeps ``--window`` messages in flight (a closed loop) to
random receivers; throughput is ``accepted`` replies per second, latency
the time from a message's write to its ``accepted``. The gateway is a child
process (a Twisted ``Site`` answering ``{"rejected": []}`` at once) that
counts the requests.
"""

import argparse
import json
import os
import random
import selectors
import socket
import sys
import time

from benchmarks import procs

GATEWAY = r'''
import sys
from twisted.internet import reactor
from twisted.web import resource, server
count = [0]
class Notify(resource.Resource):
    isLeaf = True
    def render_POST(self, request):
        request.content.read()
        count[0] += 1
        request.setHeader(b"content-type", b"application/json")
        return b'{"rejected": []}'
    def render_GET(self, request):
        return b"%d" % count[0]
site = server.Site(Notify())
site.noisy = False
port = reactor.listenTCP(0, site, interface="127.0.0.1")
print("gateway listening on %d" % port.getHost().port, flush=True)
reactor.run()
'''


def _lines(sock, buf):
    data = sock.recv(65536)
    if not data:
        raise OSError("the server closed a connection")
    buf += data
    *lines, rest = buf.split(b"\n")
    return lines, rest


def _call(sock, packets, answers):
    """Send packets, read ``answers`` lines (blocking)."""
    sock.sendall(b"".join(json.dumps(p).encode() + b"\n" for p in packets))
    got, buf = [], b""
    while len(got) < answers:
        lines, buf = _lines(sock, buf)
        got += [json.loads(x) for x in lines if x]
    return got


def prepare(port, receivers, senders, tag):
    """Receivers registered with a push registration and gone; senders
    registered and connected."""
    for i in range(receivers):
        with socket.create_connection(("127.0.0.1", port)) as s:
            r = _call(s, [{"register": "true", "sender": "r%s%d" % (tag, i)},
                          {"push": "pushkey-%d-0123456789abcdef" % i, "app": "bench.app"}], 2)
            assert r[1]["type"] == "push_set", r
    conns = []
    for i in range(senders):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _call(s, [{"register": "true", "sender": "s%s%d" % (tag, i)}], 1)
        s.setblocking(False)
        conns.append(s)
    return conns


def run(conns, receivers, tag, window, warmup, duration):
    sel = selectors.DefaultSelector()
    rnd = random.Random(1)
    state = {}
    seq = [0]

    def send(s, n):
        out = []
        now = time.monotonic()
        st = state[s]
        for _ in range(n):
            seq[0] += 1
            st["times"].append(now)
            out.append(b'{"message":"m%d","receiver":"r%s%d"}\n' % (
                seq[0], tag.encode(), rnd.randrange(receivers)))
        st["out"] += b"".join(out)
        _flush(s)

    def _flush(s):
        st = state[s]
        if st["out"]:
            try:
                sent = s.send(st["out"])
            except BlockingIOError:
                sent = 0
            st["out"] = st["out"][sent:]

    for s in conns:
        state[s] = {"times": [], "buf": b"", "out": b"", "head": 0}
        sel.register(s, selectors.EVENT_READ)
        send(s, window)
    t0 = time.monotonic()
    w0, w1 = t0 + warmup, t0 + warmup + duration
    accepted, lat, other = 0, [], {}
    while True:
        now = time.monotonic()
        if now >= w1:
            break
        for key, _ in sel.select(0.1):
            s = key.fileobj
            st = state[s]
            lines, st["buf"] = _lines(s, st["buf"])
            now = time.monotonic()
            done = 0
            for line in lines:
                if not line:
                    continue
                t = st["times"][st["head"]]
                st["head"] += 1
                done += 1
                if line.startswith(b'{"type":"accepted"'):
                    if w0 <= now < w1:
                        accepted += 1
                        lat.append(now - t)
                else:
                    kind = json.loads(line).get("code", "?")
                    other[kind] = other.get(kind, 0) + 1
            if st["head"] > 100000:
                st["times"] = st["times"][st["head"]:]
                st["head"] = 0
            if done:
                send(s, done)
        for s in conns:
            _flush(s)
    for s in conns:
        sel.unregister(s)
        s.close()
    lat.sort()

    def pct(p):
        return lat[min(len(lat) - 1, int(len(lat) * p / 100.0))] * 1000 if lat else None

    return {"accepted_per_s": accepted / duration, "p50_ms": pct(50), "p99_ms": pct(99),
            "errors": other}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.push")
    p.add_argument("--receivers", type=int, default=1000)
    p.add_argument("--senders", type=int, default=20)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", default=None)
    o = p.parse_args(argv)
    env = dict(os.environ)
    gateway = procs.Child("gateway", [sys.executable, "-c", GATEWAY], env=env)
    gport = int(gateway.wait_line(r"gateway listening on (\d+)", 30).group(1))
    url = "http://127.0.0.1:%d/_matrix/push/v1/notify" % gport
    results = {"baseline": [], "push": []}
    try:
        for rep in range(o.repeat):
            for variant in (("baseline", "push") if rep % 2 == 0 else ("push", "baseline")):
                extra = ["--push-url", url] if variant == "push" else []
                with procs.Processes() as pr:
                    server = pr.server("chatd", extra=extra)
                    tag = "%s%d" % (variant[0], rep)
                    conns = prepare(server.port, o.receivers, o.senders, tag)
                    before = _gateway_count(gport)
                    cpu0, gen0 = server.cpu(), time.process_time()
                    res = run(conns, o.receivers, tag, o.window, o.warmup, o.duration)
                    cpu1 = server.cpu()
                    res["generator_cpu_s"] = round(time.process_time() - gen0, 2)
                    res["gateway_requests"] = _gateway_count(gport) - before
                    res["server_cpu_s"] = {k: round((cpu1[k] or 0) - (cpu0[k] or 0), 2)
                                           for k in cpu1}
                    results[variant].append(res)
                    print("%-8s run %d: %8.0f accepted/s  p50 %.2f ms  p99 %.2f ms  "
                          "gateway requests %d  cpu %s  generator %.1fs  errors %s" % (
                              variant, rep + 1, res["accepted_per_s"], res["p50_ms"],
                              res["p99_ms"], res["gateway_requests"], res["server_cpu_s"],
                              res["generator_cpu_s"], res["errors"]), flush=True)
    finally:
        gateway.stop()
    best = {v: max(rs, key=lambda r: r["accepted_per_s"]) for v, rs in results.items()}
    ratio = best["push"]["accepted_per_s"] / best["baseline"]["accepted_per_s"]
    print()
    print("best of %d: baseline %.0f/s p99 %.2f ms; push %.0f/s p99 %.2f ms; "
          "throughput ratio %.2fx (target >= 0.8x)" % (
              o.repeat, best["baseline"]["accepted_per_s"], best["baseline"]["p99_ms"],
              best["push"]["accepted_per_s"], best["push"]["p99_ms"], ratio))
    if o.json:
        with open(o.json, "w") as f:
            json.dump({"runs": results, "ratio": ratio}, f, indent=1)
    return 0


def _gateway_count(port):
    import urllib.request
    with urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=10) as r:
        return int(r.read())


if __name__ == "__main__":
    sys.exit(main())
