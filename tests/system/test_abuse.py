"""
Abuse: what hostile or broken clients do to a running ``twistd chatd``, and
that everyone else keeps being served while it happens.

chatd runs as a subprocess (its own process: 10,000 sockets on each side of
a connection would not fit in one process's 20,000 files), and these tests
drive it with plain blocking sockets. A :class:`Prober` (two registered
clients in a thread, pinging and messaging each other) measures the latency
a well-behaved client sees before and during each abuse.
"""

import hashlib
import json
import os
import selectors
import shutil
import socket
import tempfile
import threading
import time

import pytest
import pytest_twisted

from chatd.hub import tokens as chatd_tokens
from tests.fixtures.nodes import ChatdProcess
from tests.fixtures.process import wait_for
from tests.fixtures.procfs import open_sockets
from tests.fixtures.valkey import redis_command
from tests.fixtures.valkey import scan_store
from tests.helpers import wait_until

DEADLINE = 10.0
#: round trips of the prober each check looks at (a count, not a duration)
SAMPLES = 20
#: every token any test of this module was given (the last test scans for them)
SEEN_TOKENS = set()

pytestmark = pytest.mark.slow


class Client:
    """A blocking line client with a deadline on every read."""

    def __init__(self, port, timeout=DEADLINE, rcvbuf=None):
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.buf = b""

    def send(self, obj):
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode() + b"\n"
        self.sock.sendall(data)

    def line(self):
        """The next server line (raw bytes); b"" when the connection closed."""
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                rest, self.buf = self.buf, b""
                return rest
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def next(self):
        line = self.line()
        assert line, "the server closed the connection"
        return json.loads(line)

    def expect(self, type, **fields):
        msg = self.next()
        assert msg.get("type") == type, "expected %s, got %r" % (type, msg)
        for k, v in fields.items():
            assert msg.get(k) == v, "expected %s=%r in %r" % (k, v, msg)
        return msg

    def until(self, type, **fields):
        """Skip lines until one of this type (and fields) comes; an error
        reply on the way fails."""
        while True:
            msg = self.next()
            if msg.get("type") == type and all(msg.get(k) == v for k, v in fields.items()):
                return msg
            assert msg.get("type") != "error", "got %r waiting for %s" % (msg, type)

    def register(self, device, **extra):
        self.send(dict({"register": "true", "sender": device}, **extra))
        token = self.expect("registered", sender=device)["token"]
        SEEN_TOKENS.add(token)
        return token

    def closed(self):
        """Read to the end; (lines, True) once the server has closed."""
        lines = []
        while True:
            line = self.line()
            if not line:
                return lines
            lines.append(json.loads(line))

    def close(self):
        self.sock.close()


class Prober(threading.Thread):
    """Two registered clients that ping (and message each other) in a loop,
    recording each round trip: the experience of a well-behaved client."""

    def __init__(self, port, name="probe"):
        super().__init__(daemon=True)
        self.a = Client(port)
        self.b = Client(port)
        self.a.register(name + "-a")
        self.b.register(name + "-b")
        self.name = name
        self.samples = []  # (when, rtt) in time.monotonic()
        self.errors = []
        self.done = threading.Event()

    def run(self):
        n = 0
        try:
            while not self.done.is_set():
                n += 1
                t0 = time.monotonic()
                self.a.send({"ping": "p%d" % n})
                self.a.until("pong", ping="p%d" % n)
                self.samples.append((t0, time.monotonic() - t0))
                if n % 5 == 0:
                    t0 = time.monotonic()
                    self.a.send({"message": "probe %d" % n, "receiver": self.name + "-b",
                                 "ref": n})
                    acc = self.a.until("accepted", ref=n)
                    push = self.b.until("message", message="probe %d" % n)
                    assert push["id"] == acc["id"]
                    self.b.send({"ack": push["id"]})
                    self.samples.append((t0, time.monotonic() - t0))
                self.done.wait(0.05)  # the sampling interval (within the rate limit)
        except Exception as e:  # reported by stop()
            self.errors.append("%s: %s" % (type(e).__name__, e))

    def rtts(self, since=0.0, until=float("inf")):
        return sorted(r for t, r in self.samples if since <= t <= until)

    def served(self, since, count=SAMPLES):
        """Wait until the prober has ``count`` round trips that started at or
        after ``since``; their RTTs, sorted. Each round trip has its own
        deadline (the client's, DEADLINE): a well-behaved client that is
        not answered fails the test, a slow answer is only reported."""
        wait_for(lambda: len(self.rtts(since)) >= count or self.errors,
                 count * (DEADLINE + 1), "%d round trips of the prober" % count)
        assert not self.errors, "the well-behaved client was failed: %s" % self.errors
        return self.rtts(since)

    def stop(self):
        self.done.set()
        self.join(DEADLINE + 5)
        self.a.close()
        self.b.close()
        assert not self.errors, "the well-behaved client was failed: %s" % self.errors


def stats(rtts):
    if not rtts:
        return "no samples"
    return "%d samples, p50 %.1f ms, p99 %.1f ms, max %.1f ms" % (
        len(rtts), 1000 * rtts[len(rtts) // 2], 1000 * rtts[int(len(rtts) * 0.99)],
        1000 * rtts[-1])


@pytest.fixture(scope="module")
def server():
    """One twistd chatd for this module: short auth timeout, a smaller
    output limit (still above the longest reply: see
    test_a_client_that_reads_is_never_cut_as_slow_consumer), the default
    rate limit. A second listener has a listen backlog of 2048 instead of
    Twisted's 50 (for the 10,000 idle connections: with 50, the kernel
    answers a burst of SYNs with SYN cookies, and a handshake whose last ACK
    it then drops leaves a client that believes in a connection the server
    never had, so no auth_timeout can ever reach it)."""
    tmp = tempfile.mkdtemp(prefix="chatd-abuse-")
    proc = ChatdProcess(tmp, ["--port", "tcp:0:interface=127.0.0.1",
                              "--listen", "tcp:0:interface=127.0.0.1:backlog=2048",
                              "--data-dir", os.path.join(tmp, "data"),
                              "--auth-timeout", "3s", "--output-limit", "256k"])
    try:
        proc.start()
        proc.wait_listening()
        wait_for(lambda: len(proc.listening_ports()) == 2, DEADLINE, "the second listener")
        proc.big_backlog_port = proc.listening_ports()[1]
        proc.store_socket = os.path.join(tmp, "data", "valkey.sock")
        yield proc
        assert proc.running, "chatd died:\n" + proc.log()[-3000:]
        assert proc.stop() in (0, -15), proc.log()[-3000:]
        bad = proc.bad_log_lines()
        assert not bad, "chatd logged tracebacks:\n" + "\n".join(bad[:20])
    finally:
        proc.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


# -- idle connections -----------------------------------------------------------------------

IDLE = 10_000


def test_ten_thousand_idle_connections_are_closed_by_auth_timeout(server):
    port = server.big_backlog_port
    base_sockets = open_sockets(server.pid)
    prober = Prober(port, "idle-probe")
    prober.start()
    socks = []
    sel = selectors.DefaultSelector()
    try:
        wait_for(lambda: len(prober.samples) >= 30, DEADLINE, "baseline samples")
        t_open = time.monotonic()
        for i in range(IDLE):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
            if i % 40 == 39:
                time.sleep(0.008)  # about 5,000 a second: well within the backlog
        opened = time.monotonic() - t_open
        for s in socks:
            sel.register(s, selectors.EVENT_READ, [b""])
        # every one must be told auth_timeout and closed
        told, closed = 0, 0
        end = time.monotonic() + 60
        while closed < IDLE:
            assert time.monotonic() < end, (
                "only %d of %d idle connections were closed (%d told auth_timeout)"
                % (closed, IDLE, told))
            for key, _ in sel.select(timeout=1.0):
                try:
                    chunk = key.fileobj.recv(4096)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    key.data[0] += chunk
                    continue
                sel.unregister(key.fileobj)
                closed += 1
                if b'"code":"auth_timeout"' in key.data[0]:
                    told += 1
        all_closed = time.monotonic() - t_open
        # registered clients were answered all along (each round trip within
        # its deadline), and still are
        during = prober.served(since=t_open)
        baseline = prober.rtts(until=t_open)
        # chatd let go of all of them
        wait_for(lambda: open_sockets(server.pid) <= base_sockets + 5, DEADLINE,
                 "chatd closing its side of the idle connections")
        prober.served(since=time.monotonic(), count=5)
    finally:
        sel.close()
        for s in socks:
            s.close()
        prober.stop()
    print("\n%d idle connections opened in %.1fs, all closed by auth_timeout %.1fs after the "
          "first; prober before: %s; during: %s" % (IDLE, opened, all_closed, stats(baseline),
                                                     stats(during)))
    assert told == IDLE


# -- a client that never reads ---------------------------------------------------------------

def test_a_client_that_never_reads_is_cut_and_keeps_its_messages(server):
    port = server.port
    sleeper = Client(port, rcvbuf=4096)
    token = sleeper.register("sleeper")
    flooders = []
    # each connection has its own rate allowance, and a 16 KB message costs
    # 16 packets of it (issue 23, item 3): enough of them to outpace the cut
    for i in range(40):
        flooders.append(Client(port))
        flooders[-1].register("flooder-%d" % i)
    prober = Prober(port, "slow-probe")
    prober.start()
    log_before = len(server.log())
    text = "z" * 16000
    n = 0
    try:
        wait_for(lambda: len(prober.samples) >= 20, DEADLINE, "baseline samples")
        t0 = time.monotonic()
        while "slow consumer" not in server.log()[log_before:]:
            assert n < 3000, "the client that never reads was never cut"
            flooder = flooders[n % len(flooders)]
            flooder.send({"message": "%d %s" % (n, text), "receiver": "sleeper", "ref": n})
            flooder.expect("accepted", ref=n)
            n += 1
        cut_after = time.monotonic() - t0
        during = prober.served(since=t0)
        # what it gets when it reads at last: pushes, then slow_consumer, then the end
        lines = sleeper.closed()
        assert lines and lines[-1].get("code") == "slow_consumer", lines[-1:]
        pushed = [m for m in lines if m.get("type") == "message"]
        assert all(m["message"].endswith(text) for m in pushed)
        # its messages stay stored, all of them waiting for its next
        # connection (which gets them: test_a_phone_with_a_big_inbox_...)
        inbox = redis_command(server.store_socket, "LRANGE", "chatd:{sleeper}:inbox", 0, -1)
        assert [json.loads(e)["message"].split()[0] for e in inbox] == [str(i) for i in range(n)]
        again = Client(port)
        again.send({"reconnect": "true", "sender": "sleeper", "token": token})
        assert again.expect("reconnected")["pending"] == n
        again.close()
    finally:
        prober.stop()
        sleeper.close()
        for flooder in flooders:
            flooder.close()
    print("\nthe non-reader was cut after %d messages (%.1f MB, %.1fs); %d were pushed before; "
          "prober during the flood: %s" % (n, n * 16000 / 1e6, cut_after, len(pushed),
                                           stats(during)))


@pytest_twisted.ensureDeferred
async def test_a_client_that_reads_is_never_cut_as_slow_consumer(chatd, clients):
    """slow_consumer is for a client that does not read. One reply bigger
    than --output-limit (a pong echoes up to --max-line bytes; both values
    are accepted by chatd's option checks) must not cut a client that reads."""
    node = await chatd(max_line=300_000, output_limit=200_000)
    c = await clients(node)
    await c.register("reader")
    c.send({"ping": "x" * 250_000})
    assert (await c.next())["type"] == "pong"
    c.send({"ping": "small"})
    assert await c.next() == {"type": "pong", "ping": "small"}


@pytest_twisted.ensureDeferred
async def test_a_phone_with_a_big_inbox_gets_it_all_on_reconnect(chatd, clients, redis):
    """Default settings. A phone offline while 80 messages of 15 KB (1.2 MB)
    arrive must get them on its next connection and be able to ack them;
    it reads everything, so it is no slow consumer. (chatd pushes the first
    batch of waiting messages in one write; that write alone is over
    --output-limit, 1 MiB.)"""
    node = await chatd()
    phone = await clients(node)
    token = await phone.register("phone")
    await phone.close()
    sender = await clients(node)
    await sender.register("sender")
    for i in range(80):
        sender.send({"message": "%03d %s" % (i, "p" * 15000), "receiver": "phone", "ref": i})
        await sender.expect("accepted", ref=i)
    again = await clients(node)
    await again.reconnect("phone", token)
    pushed = [await again.expect("message") for _ in range(80)]
    assert [m["message"][:3] for m in pushed] == ["%03d" % i for i in range(80)]
    again.send({"ack": pushed[-1]["id"]})
    assert await again.sync() == [], "the reading phone was cut (or got more)"
    await wait_until(lambda: redis.command("LLEN", "chatd:{phone}:inbox") == 0,
                     what="the ack of the 80 messages")


# -- connection flood -------------------------------------------------------------------------

FLOOD = 2000


def _flood(port, count, seed, errors):
    import random
    rng = random.Random(seed)
    for i in range(count):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
            kind = rng.randrange(6)
            if kind == 1:
                s.sendall(b'{"ping": "x"}\n')
            elif kind == 2:
                s.sendall(b'{"register": "true", "sender": "flood-%d"}\n' % rng.randrange(50))
            elif kind == 3:
                s.sendall(b'{"message": "half a li')
            elif kind == 4:
                s.sendall(os.urandom(rng.randrange(1, 200)))
            if kind == 5 or rng.random() < 0.3:
                # close with a RST instead of a FIN
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
        except OSError as e:
            errors.append(repr(e))


def test_connection_flood(server):
    """Thousands of connections opened and closed as fast as 8 threads can
    (closed at once, with a RST, after half a line, after a register...).
    Connected clients keep being answered; newcomers still get in; chatd
    ends up holding none of them. (chatd's listen backlog, 1024 unless the
    endpoint gives one, holds the burst: with Twisted's 50 the flood spent
    most of its time in SYN retransmits.)"""
    port = server.port
    base_sockets = open_sockets(server.pid)
    prober = Prober(port, "flood-probe")
    prober.start()
    errors, joins = [], []
    done = threading.Event()

    def newcomers():
        n = 0
        while not done.is_set():
            n += 1
            t0 = time.monotonic()
            try:
                c = Client(port)
                c.register("newcomer-%d" % n)
                c.close()
                joins.append(time.monotonic() - t0)
            except Exception as e:
                errors.append("newcomer: %r" % e)
            done.wait(0.1)

    try:
        wait_for(lambda: len(prober.samples) >= 20, DEADLINE, "baseline samples")
        t0 = time.monotonic()
        threads = [threading.Thread(target=_flood, args=(port, FLOOD // 8, k, errors))
                   for k in range(8)]
        newcomer = threading.Thread(target=newcomers)
        for t in threads + [newcomer]:
            t.start()
        for t in threads:
            t.join(120)
        done.set()
        newcomer.join(DEADLINE + 5)
        elapsed = time.monotonic() - t0
        during = prober.served(since=t0)
        wait_for(lambda: open_sockets(server.pid) <= base_sockets + 5, 30,
                 "chatd closing every flood connection")
    finally:
        done.set()
        prober.stop()
    joins.sort()
    print("\n%d connections opened and closed in %.1fs (%.0f/s); connected prober: %s; "
          "newcomers (connect + register): %s" % (FLOOD, elapsed, FLOOD / elapsed, stats(during),
                                                   stats(joins)))
    # every connect, and every newcomer's register, within its deadline
    assert not errors, errors[:5]
    assert joins, "no newcomer got in"


# -- oversize lines ----------------------------------------------------------------------------

MAX_LINE = 65536


def test_oversize_lines(server):
    port = server.port
    c = Client(port)
    try:
        # a line of exactly the limit is fine, and so is its telnet \r
        head = b'{"ping":"'
        line = head + b"x" * (MAX_LINE - len(head) - 2) + b'"}'
        assert len(line) == MAX_LINE
        c.send(line + b"\r\n")
        assert c.expect("pong")["ping"] == "x" * (MAX_LINE - len(head) - 2)
        c.send(b'{"ping":"' + b"y" * MAX_LINE + b'"}\n')
        lines = c.closed()
        assert [m["code"] for m in lines] == ["line_too_long"]
    finally:
        c.close()
    # a line with no newline at all: cut once it passes the limit (chatd
    # does not buffer it to the end)
    c = Client(port)
    sent = 0
    try:
        chunk = b"z" * 65536
        try:
            while sent < 64 * 1024 * 1024:
                c.sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass
        lines = c.closed()
        assert [m["code"] for m in lines] == ["line_too_long"], lines
    finally:
        c.close()
    assert sent < 64 * 1024 * 1024, "chatd kept reading a line with no end"
    ok = Client(port)
    ok.send({"ping": "still fine"})
    ok.expect("pong")
    ok.close()


# -- rate limit ---------------------------------------------------------------------------------

def test_rate_limit_kicks_in_and_recovers(server):
    """Default allowance: 50 packets/s in bursts of 100."""
    port = server.port
    c = Client(port)
    other = Client(port)
    try:
        c.register("eager")
        other.register("calm")
        burst = 250  # over the allowance, but not so far over that it is closed
        c.send(b"".join(b'{"ping": %d, "ref": "p%d"}\n' % (i, i) for i in range(burst)))
        # another connection is not limited by it
        other.send({"message": "unaffected", "receiver": "eager", "ref": "u1"})
        other.expect("accepted", ref="u1")
        # a message over the allowance is not acted on either
        c.send({"message": "over the limit", "receiver": "calm", "ref": "m-over"})
        # after a while the bucket has refilled: served again
        time.sleep(0.2)  # time itself is what is tested: the refill (20 ms a token)
        c.send({"ping": "again", "ref": "after"})
        replies = []
        while not replies or replies[-1].get("ping") != "again":
            replies.append(c.next())
        pongs = [r for r in replies if r["type"] == "pong"][:-1]
        limited = [r for r in replies if r.get("code") == "rate_limited"]
        pushed = [r for r in replies if r["type"] == "message"]
        # the message is dropped (in silence, or as the first one dropped),
        # unless the bucket had refilled by then
        over = [r for r in replies if r.get("ref") == "m-over" and r["type"] == "accepted"]
        assert len(pongs) + len(limited) + len(pushed) + len(over) + 1 == len(replies), [
            r for r in replies if r["type"] != "pong"]
        # the burst (less the register's token) goes through, then the limit
        # holds but for the refill (50/s) while the burst is being read; the
        # first packet dropped is answered rate_limited, the rest in silence
        assert all(r["type"] == "pong" for r in replies[:95]), replies[:95]
        assert 95 <= len(pongs) < 150 and len(limited) == 1, (len(pongs), len(limited))
        assert [r["ping"] for r in pongs] == sorted(r["ping"] for r in pongs)
        assert [m["message"] for m in pushed] == ["unaffected"]
        c.send({"message": "later", "receiver": "calm", "ref": "m2"})
        c.until("accepted", ref="m2")
        if over:  # the bucket had refilled by then: it was stored, and comes first
            other.expect("message", message="over the limit")
        other.expect("message", message="later")
    finally:
        c.close()
        other.close()


# -- proof mode: no takeover -------------------------------------------------------------------

def test_proof_mode_stops_an_id_takeover(tmp_short):
    secret = b"the number-verification service's secret\n"
    secret_file = os.path.join(tmp_short, "secret")
    with open(secret_file, "wb") as f:
        f.write(secret)
    key = secret[:-1]  # less one trailing newline
    proc = ChatdProcess(tmp_short, ["--port", "tcp:0:interface=127.0.0.1",
                                    "--data-dir", os.path.join(tmp_short, "data"),
                                    "--registration", "proof",
                                    "--registration-secret-file", secret_file])
    victim = attacker = friend = None
    try:
        proc.start()
        port = proc.wait_listening()
        now = int(time.time())
        victim = Client(port)
        token = victim.register("0011001100",
                                proof=chatd_tokens.make_proof(key, "0011001100", now + 300))
        friend = Client(port)
        friend.register("987654321", proof=chatd_tokens.make_proof(key, "987654321", now + 300))
        attacker = Client(port)
        good = chatd_tokens.make_proof(key, "0011001100", now + 300)
        tries = [
            {},                                                          # no proof
            {"proof": chatd_tokens.make_proof(key, "0011001100", now - 1)},     # expired
            {"proof": chatd_tokens.make_proof(key, "666", now + 300)},          # another id's
            {"proof": chatd_tokens.make_proof(b"guessed", "0011001100", now + 300)},  # forged
            {"proof": good.upper()},                                     # not lowercase hex
            {"proof": good[:-1]},                                        # truncated
            {"proof": "%d:%s" % (now + 300, "0" * 64)},
            {"proof": "99999999999999:" + good.split(":")[1]},           # its expiry changed
            {"proof": good + "00"},
            {"proof": ["not", "a", "string"]},
        ]
        for extra in tries:
            attacker.send(dict({"register": "true", "sender": "0011001100"}, **extra))
            r = attacker.next()
            assert r["type"] == "error" and r["code"] in ("forbidden", "bad_field"), (extra, r)
        attacker.send({"reconnect": "true", "sender": "0011001100", "token": "guess" * 6})
        assert attacker.next()["code"] == "bad_token"
        attacker.send({"message": "it's me", "sender": "0011001100", "token": "guess" * 6,
                       "receiver": "987654321"})
        assert attacker.next()["code"] == "bad_token"
        # with a ticket for its own id it gets in, but only as itself
        attacker.register("666", proof=chatd_tokens.make_proof(key, "666", now + 300))
        attacker.send({"register": "true", "sender": "0011001100", "proof": good})
        assert attacker.next()["code"] == "forbidden"
        attacker.send({"message": "it's me", "sender": "0011001100", "receiver": "987654321"})
        assert attacker.next()["code"] == "forbidden"
        # the victim kept its connection and its token, and gets its messages
        friend.send({"message": "are you there?", "receiver": "0011001100", "ref": 1})
        friend.expect("accepted", ref=1)
        push = victim.expect("message", message="are you there?", sender="987654321")
        victim.send({"ack": push["id"]})
        victim.send({"ping": "still me"})
        victim.expect("pong", ping="still me")
        other = Client(port)
        other.send({"reconnect": "true", "sender": "0011001100", "token": token})
        other.expect("reconnected", sender="0011001100")
        other.close()
        assert victim.closed()[-1]["code"] == "session_replaced"  # by its own token only
        # hang up before the stop (a client that does not would hold it up
        # for the close grace)
        for c in (victim, attacker, friend):
            c.close()
        assert proc.stop() in (0, -15)
        assert not proc.bad_log_lines(), proc.log()[-3000:]
    finally:
        for c in (victim, attacker, friend):
            if c is not None:
                c.close()
        proc.cleanup()


# -- tokens never in clear ------------------------------------------------------------------------

def test_tokens_are_never_stored_or_logged(server):
    """Tokens of every test of this module (registered, re-registered,
    shown on reconnect and one-shot sends, wrong ones too) appear nowhere in
    the store -- keys, values, the append-only files -- nor in chatd's log."""
    port = server.port
    a = Client(port)
    b = Client(port)
    try:
        first = a.register("leaky-a")
        b.register("leaky-b")
        a.send({"reconnect": "true", "sender": "leaky-a", "token": first})
        a.expect("reconnected")
        a.send({"message": "with my token", "receiver": "leaky-b", "token": first, "ref": 1})
        a.expect("accepted")
        second = a.register("leaky-a")  # revokes the first
        one_shot = Client(port)
        one_shot.send({"message": "one-shot", "sender": "leaky-a", "token": second,
                       "receiver": "leaky-b", "ref": 2})
        one_shot.expect("accepted")
        one_shot.send({"message": "revoked", "sender": "leaky-a", "token": first,
                       "receiver": "leaky-b", "ref": 3})
        assert one_shot.next()["code"] == "bad_token"
        one_shot.send({"reconnect": "true", "sender": "leaky-b", "token": first})
        assert one_shot.next()["code"] == "bad_token"
        one_shot.close()
    finally:
        a.close()
        b.close()
    secrets = sorted(SEEN_TOKENS)
    assert second in secrets and len(secrets) >= 3

    def store(*args):
        return redis_command(server.store_socket, *args)

    # the scan reads the right store: it finds the hash of the current token
    contents = scan_store(store)
    values = [v for _, vs in contents for v in vs]
    assert hashlib.sha256(second.encode()).hexdigest().encode() in values
    assert b"db0" in store("INFO", "keyspace") and b"db1" not in store("INFO", "keyspace")
    store("BGREWRITEAOF")  # the AOF on disk, both as rewritten and as appended
    data_dir = os.path.dirname(server.store_socket)
    files = {}
    for root, _, names in os.walk(data_dir):
        for name in names:
            path = os.path.join(root, name)
            if not name.endswith(".sock"):
                with open(path, "rb") as f:
                    files[path] = f.read()
    assert any(b"chatd:{leaky-a}:token" in data for data in files.values()), list(files)
    log = server.log().encode()
    for token in secrets:
        t = token.encode()
        for k, vs in contents:
            assert t not in k and not any(t in v for v in vs), "token stored in clear in %r" % k
        for path, data in files.items():
            assert t not in data, "token in clear in %s" % path
        assert t not in log, "token in chatd's log"
