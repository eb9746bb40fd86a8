"""The store client: every call has a deadline, failures become
StoreUnavailable, and it recovers by itself. Against a real server that the
tests stop, freeze (SIGSTOP) and start again."""

import os
import signal

import pytest
import pytest_twisted

from chatd.redisclient import RedisClient, StoreUnavailable
from tests.helpers import with_deadline

ensure = pytest_twisted.ensureDeferred


@pytest_twisted.async_yield_fixture
async def client(own_redis):
    from twisted.internet import reactor
    c = RedisClient(own_redis.target, 0.5, reactor).connect()
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
    # a store that forgot its scripts (restart, SCRIPT FLUSH) gets them again
    own_redis.command("SCRIPT", "FLUSH")
    assert await client.script("ack", [b"chatd:{a}:inbox"], [5]) == 0


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
