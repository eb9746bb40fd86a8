"""The store client: every call has a deadline, failures become
StoreUnavailable, and it recovers by itself. Against a real server that the
tests stop, freeze (SIGSTOP) and start again."""

import os
import shutil
import signal

import pytest
import pytest_twisted

from chatd.errors import StoreUnavailable
from chatd.redis.client import RedisClient
from chatd.store.library import Library
from tests.helpers import wait_until, with_deadline

ensure = pytest_twisted.ensureDeferred


@pytest_twisted.async_yield_fixture
async def client(own_redis):
    from twisted.internet import reactor
    c = RedisClient(own_redis.target, 0.5, reactor, library=Library()).connect()
    assert await with_deadline(c.when_connected(5), what="connection")
    yield c
    await c.close()


async def fails(d, deadline=5.0):
    """The call fails with StoreUnavailable (rather than waiting forever, as
    txredisapi alone would): within a deadline ten times the client's 0.5 s,
    which only a hang misses."""
    with pytest.raises(StoreUnavailable):
        await with_deadline(d, deadline, "a failure")


async def answers_again(client, attempts=50):
    """PING until the client gets through (each attempt has its deadline)."""
    for _ in range(attempts):
        try:
            assert await client.call(b"PING") == b"PONG"
            return
        except StoreUnavailable:
            continue
    pytest.fail("the client did not recover")


@ensure
async def test_calls_and_scripts(client, own_redis):
    assert await client.call(b"PING") == b"PONG"
    own_redis.command("SET", "chatd:{a}:seq", "7")
    assert await client.script("fetch", [b"chatd:{a}:inbox", b"chatd:{a}:seq"],
                               [0, 10, 0, 1000]) == [0, b"7"]
    # chatd's Lua is a function library: the script cache is not used
    own_redis.command("SCRIPT", "FLUSH")
    assert await client.script("ack", [b"chatd:{a}:inbox"], [5]) == 0
    libs = own_redis.command("FUNCTION", "LIST")
    assert [lib[1] for lib in libs] == [client.library.name.encode()]


@ensure
async def test_library_is_loaded_before_anything_after_a_restart(client, own_redis):
    """Calls made while the store is down wait for the connection, and the
    library is loaded on it before them: none fails for want of it."""
    own_redis.stop()
    # it comes back empty (a new machine, a failover to an empty replica):
    # no functions at all
    shutil.rmtree(os.path.join(own_redis.directory, "appendonlydir"))
    await wait_until(lambda: client._conn() is None, what="the client sees the store gone")
    calls = [client.script("ack", [b"chatd:{a}:inbox"], [i]) for i in range(5)]
    own_redis.start()
    await own_redis.await_ready()
    assert [await with_deadline(d) for d in calls] == [0] * 5


@ensure
async def test_function_flush_fails_calls_then_recovers(client, own_redis):
    """An operator's FUNCTION FLUSH: the call that meets it is unavailable
    (never run later, behind newer calls), and the library is loaded again."""
    assert await client.script("ack", [b"chatd:{a}:inbox"], [1]) == 0
    own_redis.command("FUNCTION", "FLUSH")
    with pytest.raises(StoreUnavailable):
        await with_deadline(client.script("ack", [b"chatd:{a}:inbox"], [2]))
    assert await client.script("ack", [b"chatd:{a}:inbox"], [3]) == 0


@ensure
async def test_error_reply_is_unavailable(client):
    with pytest.raises(StoreUnavailable) as e:
        await client.call(b"NOSUCHCOMMAND")
    assert "NOSUCHCOMMAND" in str(e.value) or "unknown" in str(e.value).lower()


@pytest.mark.slow
@ensure
async def test_store_down_fails_fast_and_recovers(client, own_redis):
    own_redis.stop()
    # txredisapi alone would wait forever here
    await fails(client.call(b"PING"))
    own_redis.start().wait_ready()
    # a call made while reconnecting waits for the connection (within its deadline)
    await answers_again(client)


@pytest.mark.slow
@ensure
async def test_frozen_store_times_out_then_recovers(client, own_redis):
    """A store that accepts but does not answer (SIGSTOP) is cut after the
    deadline, and the client reconnects once it answers again."""
    assert await client.call(b"PING") == b"PONG"
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        d1, d2 = client.call(b"PING"), client.call(b"PING")
        await fails(d1)
        await fails(d2)
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    await answers_again(client)


@ensure
async def test_a_primary_turned_replica_is_left_for_a_new_connection(client, own_redis):
    """A write refused with READONLY (a failover demoted the primary under
    an open connection) is 'unavailable', and the connection is cut so that
    the next one finds the primary again (through the sentinels, if any)."""
    from tests.fixtures.process import fixed_port
    before = await client.call(b"CLIENT", b"ID")
    own_redis.command("REPLICAOF", "127.0.0.1", str(fixed_port()))  # nobody there
    try:
        with pytest.raises(StoreUnavailable, match="replica"):
            await with_deadline(client.script("ack", [b"chatd:{a}:inbox"], [5]), 5.0)
    finally:
        own_redis.command("REPLICAOF", "NO", "ONE")
    await answers_again(client)
    assert await client.call(b"CLIENT", b"ID") != before


@ensure
async def test_store_acks_waits_once_per_batch_and_refuses_what_no_replica_holds(replicated):
    from twisted.internet import defer, reactor

    from chatd.redis.target import RedisTarget
    from tests.fixtures.valkey import info
    primary, replica = replicated
    c = RedisClient(RedisTarget(host="127.0.0.1", port=primary.port), 1.0, reactor,
                    library=Library(), acks=1).connect()
    try:
        assert await with_deadline(c.when_connected(5), what="connection")
        primary.command("CONFIG", "RESETSTAT")
        # 50 writes in one go: each answered once the replica holds it, with
        # one WAIT for the first and one for all the others (group commit)
        calls = [c.script("ack", [b"chatd:{d%d}:inbox" % i], [5]) for i in range(50)]
        assert await with_deadline(defer.gatherResults(calls), 10.0) == [0] * 50
        stats = primary.command("INFO", "commandstats").decode()
        waits = int(stats.split("cmdstat_wait:calls=")[1].split(",")[0])
        assert waits <= 2, stats
        # reads are waited for too, and a fetch writes the counter as it is,
        # so that its WAIT covers what it read (writes of other connections)
        primary.command("SET", "chatd:{a}:seq", "7")
        before = int(info(primary.port, "replication")["master_repl_offset"])
        assert await c.script("fetch", [b"chatd:{a}:inbox", b"chatd:{a}:seq"],
                              [0, 10, 0, 1000, 0, 1]) == [0, b"7"]
        assert int(info(primary.port, "replication")["master_repl_offset"]) > before
        stats = primary.command("INFO", "commandstats").decode()
        assert int(stats.split("cmdstat_wait:calls=")[1].split(",")[0]) == waits + 1

        # the replica stops answering: the write is done on the primary, but
        # not confirmed, so its caller is told 'unavailable'
        primary.command("RPUSH", "chatd:{b}:inbox", '{"type":"message","id":"%016d",'
                        '"sent_at":1,"sender":"a","receiver":"b","message":"x"}' % 1)
        replica.send_signal(signal.SIGSTOP)
        with pytest.raises(StoreUnavailable, match="0 of 1 replica"):
            await with_deadline(c.script("ack", [b"chatd:{b}:inbox"], [1]), 5.0)
        assert primary.command("LLEN", "chatd:{b}:inbox") == 0  # done, though
        assert c.stats.unconfirmed == 1
        replica.send_signal(signal.SIGCONT)
        await wait_until(lambda: info_link_up(replica), what="the replica back")
        assert await with_deadline(c.script("ack", [b"chatd:{e}:inbox"], [1]), 5.0) == 0
    finally:
        await c.close()


def info_link_up(server):
    from tests.fixtures.valkey import info
    try:
        return info(server.port, "replication").get("master_link_status") == "up"
    except (OSError, ConnectionError):
        return False
