"""
Options and start-up paths at run time, not only parsed (issue 16, section
3): ``--dedup-window 0``, ``--ref-ttl`` expiry, ``--redis`` with a database
number, a password and TLS, a ``unix:`` listener, the listen backlog, a start
that fails, a start with the store down, and the retry of an inbox read that
failed. Real store, real sockets; ``twistd`` where the process is the subject.

Each test was run against chatd broken on purpose (named in its docstring)
and failed.
"""

import dataclasses
import os
import socket

import pytest
import pytest_twisted

from chatd.app.config import DEFAULT_BACKLOG
from chatd.redis.target import parse_redis_url
from tests.clients import _client_protocol, LineClient
from tests.fixtures.nodes import ChatdProcess
from tests.fixtures.process import wait_for
from tests.fixtures.procfs import group_members
from tests.fixtures.valkey import ValkeyServer
from tests.helpers import DEADLINE, pair, pass_time, wait_until, with_deadline

ensure = pytest_twisted.ensureDeferred


async def a_message_goes_through(a, b, text="through"):
    a.send({"message": text, "receiver": "bob"})
    accepted = await a.expect("accepted")
    push = await b.expect("message", message=text)
    assert push["id"] == accepted["id"]


# -- settings ----------------------------------------------------------------------

@ensure
async def test_dedup_window_zero_turns_dedup_off(chatd, clients):
    """(Broken: the send script checks the dedup marker when the window is 0.)"""
    node, a, b = await pair(chatd, clients, dedup_window=0)
    for _ in range(3):
        a.send({"message": "same text", "receiver": "bob"})
        await a.expect("accepted")
    assert [m["message"] for m in await b.sync()] == ["same text"] * 3


@ensure
async def test_a_retry_after_the_ref_ttl_is_a_new_send(chatd, clients):
    """Within --ref-ttl a retry with the same ref gets the first reply and
    stores nothing; once it has passed, the same ref is a new message.
    (Broken: --ref-ttl ignored, the record kept for the default 24 h.)"""
    node, a, b = await pair(chatd, clients, ref_ttl=0.3, dedup_window=0)
    retry = {"message": "hello", "receiver": "bob", "ref": "r1"}
    a.send(retry)
    first = (await a.expect("accepted", ref="r1"))["id"]
    await b.expect("message", id=first)
    # retry until the answer is a new id (every retry before that is the
    # first reply again, and pushes nothing)
    for _ in range(int(DEADLINE / 0.1)):
        a.send(retry)
        got = (await a.expect("accepted", ref="r1"))["id"]
        if got != first:
            break
        await pass_time(0.1)
    else:
        raise AssertionError("the ref record outlived --ref-ttl by %gs" % DEADLINE)
    assert [m["id"] for m in await b.sync()] == [got]


@ensure
async def test_listen_backlog_defaults_to_1024(chatd):
    """(Broken: with_backlog not applied where the listeners are built.)"""
    node = await chatd(listen=("tcp:0:interface=127.0.0.1:backlog=7",))
    assert [p.backlog for p in node.service.ports] == [DEFAULT_BACKLOG, 7]


# -- listeners ---------------------------------------------------------------------

async def connect_unix(path):
    from twisted.internet import reactor
    from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
    client = LineClient()
    await with_deadline(connectProtocol(UNIXClientEndpoint(reactor, path),
                                        _client_protocol(client)), DEADLINE, "connection")
    return client


@ensure
async def test_a_unix_listener_serves_like_tcp(chatd, clients, tmp_short):
    """A phone on a unix socket chats with one on TCP. (Broken: the
    listener's address logged as host:port, which a unix socket has not.)"""
    path = os.path.join(tmp_short, "chatd.sock")
    node = await chatd(listen=("unix:" + path,))
    u = await connect_unix(path)
    try:
        await u.register("alice")
        b = await clients(node)
        await b.register("bob")
        await a_message_goes_through(u, b)
        b.send({"message": "back", "receiver": "alice"})
        await b.expect("accepted")
        await u.expect("message", message="back")
    finally:
        await u.close()
        await node.stop()  # before tmp_short goes (it unlinks the socket)


# -- --redis ---------------------------------------------------------------------------

@ensure
async def test_redis_database_number_is_used(chatd, clients, redis):
    """``--redis unix:///...?db=3``: chatd's keys are in database 3, none in 0.
    (Broken: the client ignores the database number.)"""
    target = parse_redis_url("unix://%s?db=3" % redis.path)
    node, a, b = await pair(chatd, clients, target)
    await a_message_goes_through(a, b)
    assert redis.command("EXISTS", "chatd:{bob}:token", db=3) == 1
    assert redis.command("LLEN", "chatd:{bob}:inbox", db=3) == 1
    assert redis.command("DBSIZE") == 0


@pytest.mark.slow
@ensure
async def test_redis_password_is_used(chatd, clients, tmp_short):
    """A store with requirepass: chatd authenticates with the password of
    ``--redis`` (here ``unix:///...?password=``). (Broken: no AUTH sent.)"""
    store = ValkeyServer(tmp_short, password="s3cret pw")
    try:
        store.start().wait_ready()
        target = parse_redis_url("unix://%s?password=s3cret%%20pw" % store.path)
        node, a, b = await pair(chatd, clients, target)
        await a_message_goes_through(a, b)
        assert store.command("EXISTS", "chatd:{bob}:token") == 1
        await node.stop()
    finally:
        store.cleanup()


def tls_proxy(key_path, cert_path, unix_path):
    """A TLS listener on 127.0.0.1 in front of a store's unix socket (the
    test store has no TLS of its own): each TLS connection is piped to a new
    connection to the store. The listening port."""
    from twisted.internet import endpoints, reactor

    from tests.helpers import ssl_port, unix_proxy_factory
    return endpoints.serverFromString(reactor, ssl_port(key_path, cert_path)).listen(
        unix_proxy_factory(unix_path))


@pytest.mark.slow
@ensure
async def test_rediss_speaks_tls_to_the_store(chatd, clients, redis, tmp_path):
    """``--redis rediss://host:port/db`` talks TLS to the store (behind a TLS
    proxy that speaks nothing else). (Broken: a plain TCP connection.)"""
    from tests.helpers import make_certificate
    key_path, cert_path = make_certificate(str(tmp_path))
    port = await tls_proxy(key_path, cert_path, redis.path)
    try:
        target = dataclasses.replace(
            parse_redis_url("rediss://localhost:%d/2" % port.getHost().port),
            tls_ca_file=cert_path)  # the store's certificate is verified
        node, a, b = await pair(chatd, clients, target)
        await a_message_goes_through(a, b)
        assert redis.command("EXISTS", "chatd:{bob}:token", db=2) == 1
        await node.stop()
    finally:
        await port.stopListening()


# -- starting ----------------------------------------------------------------------------

@pytest.mark.slow
@ensure
async def test_a_start_with_the_store_down_listens_and_recovers(chatd, clients, own_redis):
    """chatd starts while its store is down: it listens, answers
    ``unavailable`` to what needs the store, and serves once the store is up.
    (Broken: the start fails when the store does not answer at once.)"""
    own_redis.stop()
    node = await chatd(target=own_redis.target, redis_timeout=0.5)
    c = await clients(node)
    c.send({"register": "true", "sender": "early"})
    await c.error("unavailable", timeout=5)
    c.send({"ping": "up"})
    await c.expect("pong", ping="up")
    own_redis.start().wait_ready()
    assert await node.service.client.when_connected(10), "chatd did not connect"
    await c.register("early")


@pytest.mark.slow
def test_a_start_that_fails_exits_and_says_why(tmp_short):
    """``twistd -n chatd`` on a port that is taken: it says so and exits
    with a non-zero status (systemd and scripts read it), and stops the
    embedded store it had started (nothing left running).
    (Broken: the failure logged, but the reactor not stopped; or the exit
    status 0, twistd's after reactor.stop.)"""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    proc = ChatdProcess(tmp_short, ["--port", "tcp:%d:interface=127.0.0.1" % port,
                                    "--data-dir", os.path.join(tmp_short, "data")])
    try:
        proc.start()
        try:
            status = proc.wait(30)
        except Exception:
            raise AssertionError("chatd did not exit:\n" + proc.log()[-3000:]) from None
        log = proc.log()
        assert status == 1, (status, log)
        assert "chatd: could not start" in log and "Address already in use" in log, log
        assert "chatd listening" not in log, log
        wait_for(lambda: not group_members(proc.pid), DEADLINE, "the embedded store stopping")
    finally:
        taken.close()
        proc.cleanup()


@pytest.mark.slow
@ensure
async def test_an_inbox_read_that_fails_is_retried(chatd, clients, own_redis):
    """A phone is being pushed a big inbox when the store goes away: chatd
    retries the read (backing off) while the phone is bound, and the phone
    gets every message once, in order, when the store is back.

    The phone stops reading after its reconnect, so that the push stops
    midway (chatd waits for it to read); the store is stopped; then it reads
    again. (Broken: no retry scheduled after the failed read.)"""
    from twisted.logger import globalLogPublisher
    node = await chatd(target=own_redis.target, redis_timeout=0.5, drain_batch=2)
    a = await clients(node)
    await a.register("alice")
    b = await clients(node)
    token = await b.register("bob")
    await b.close()
    count, text = 64, "x" * 15000
    for i in range(count):
        a.send({"message": "%02d %s" % (i, text), "receiver": "bob", "ref": i})
        await a.expect("accepted", ref=i)
    phone = await connect_small_buffer(node.port)
    phone.proto.transport.pauseProducing()
    # and chatd's side of it a small send buffer (the kernel would otherwise
    # grow it to megabytes: the whole inbox would fit)
    [server_side] = await wait_until(
        lambda: [c for c in node.factory.connections if c.device is None],
        what="chatd accepting the phone")
    server_side.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    phone.send({"reconnect": "true", "sender": "bob", "token": token})

    def push_stalled():
        conns = [c for c in node.factory.connections if c.device == "bob"]
        return conns and "output" in conns[0]._pauses

    await wait_until(push_stalled, what="the push to a phone that does not read stalling")
    retries = []

    def observe(event):
        if event.get("log_format", "").startswith("cannot read the inbox"):
            retries.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        own_redis.stop()
        phone.proto.transport.resumeProducing()
        await wait_until(lambda: retries, what="a failed inbox read")
        own_redis.start().wait_ready()
        await phone.expect("reconnected", sender="bob", pending=count)
        pushed = [await phone.expect("message", timeout=30) for _ in range(count)]
    finally:
        globalLogPublisher.removeObserver(observe)
    assert [m["message"][:2] for m in pushed] == ["%02d" % i for i in range(count)]
    phone.send({"ack": pushed[-1]["id"]})
    assert await phone.sync() == []
    await phone.close()


async def connect_small_buffer(port):
    """A LineClient whose socket has a 4 KB receive buffer from the start
    (so that a client that stops reading stalls the pushes at once)."""
    from twisted.internet import protocol, reactor
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(DEADLINE)
    s.connect(("127.0.0.1", port))  # the kernel completes it before chatd accepts
    client = LineClient()
    factory = protocol.Factory.forProtocol(lambda: _client_protocol(client))
    try:
        reactor.adoptStreamConnection(s.fileno(), socket.AF_INET, factory)
    finally:
        s.close()  # Twisted has its own copy of the descriptor
    return client
