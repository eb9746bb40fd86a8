"""
The test harness: the fixtures of the real processes (tests/fixtures/, one
module per kind: the session's valkey-server, flushed between tests, a
cluster, a sentinel set, chatd nodes), test clients, a check that every test
leaves no listening port, connection or delayed call behind, and the
options (``--long``) and order of a run (in parallel with pytest-xdist:
setup.cfg's ``-n``).

The reactor is not imported at module level (pytest-twisted installs it).
"""

import os
import shutil
import tempfile

import pytest
import pytest_twisted

from tests.fixtures.cluster import cluster, failover  # noqa: F401 (fixtures)
from tests.fixtures.chatd_client import client, state_dir  # noqa: F401
from tests.fixtures.gateway import gateway  # noqa: F401
from tests.fixtures.nodes import chatd  # noqa: F401
from tests.fixtures.sentinel import sentinels  # noqa: F401
from tests.fixtures.valkey import own_redis, redis, redis_server, replicated  # noqa: F401


def _reactor_state(reactor):
    return (set(reactor.getReaders()), set(reactor.getWriters()))


@pytest_twisted.async_yield_fixture(autouse=True)
async def no_leftovers():
    """Fail a test that leaves a port, a connection or a delayed call behind."""
    from twisted.internet import reactor, task
    before = _reactor_state(reactor)
    calls_before = set(reactor.getDelayedCalls())
    yield
    # closing sockets and cancelling timers can take a few reactor turns
    for _ in range(100):
        readers, writers = _reactor_state(reactor)
        calls = [c for c in reactor.getDelayedCalls()
                 if c.active() and c not in calls_before]
        if readers <= before[0] and writers <= before[1] and not calls:
            return
        await task.deferLater(reactor, 0.02, lambda: None)
    left = [repr(x) for x in (readers - before[0]) | (writers - before[1])]
    left += [repr(c) for c in calls]
    pytest.fail("the test left these behind:\n  " + "\n  ".join(left))


@pytest.fixture
def tmp_short():
    """A short temp dir (unix socket paths are limited to ~107 bytes)."""
    d = tempfile.mkdtemp(prefix="chatd-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest_twisted.async_yield_fixture
async def clients():
    """Open test clients: ``await clients(node)``; all closed at the end."""
    from tests.clients import connect
    opened = []

    async def open_client(node, **kw):
        c = await connect(node.port, **kw)
        opened.append(c)
        return c

    yield open_client
    for c in opened:
        await c.close()


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="run the chaos tests in their long form (%d s, %d clients "
                          "each) instead of the short one" % (LONG_CHAOS["duration"],
                                                             LONG_CHAOS["clients"]))


#: module-scoped fixtures of real replicated stores (started once per module)
SHARED_STORES = {"cluster"}

#: the chaos tests' long form (``--long``), as docs/testing.rst runs it by hand
LONG_CHAOS = {"duration": 600, "clients": 200}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # in parallel (pytest-xdist) the slow ones first: each worker takes
        # the next test when it is free, so the long ones overlap each other
        # and the short ones fill the gaps at the end
        items.sort(key=lambda item: 0 if item.get_closest_marker("slow") else 1)
    else:
        # one at a time, the slow ones last, so a quick failure shows early
        items.sort(key=lambda item: 1 if item.get_closest_marker("slow") else 0)
    for item in items:
        if SHARED_STORES & set(getattr(item, "fixturenames", ())):
            # the tests of a module's shared cluster or sentinel set run on
            # one worker (--dist loadgroup), which starts it once
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
        if config.getoption("--long") and item.get_closest_marker("chaos"):
            item.add_marker(pytest.mark.timeout(LONG_CHAOS["duration"] + 300), append=False)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "chaos: a chaos run (its long form with --long)")
    os.environ.setdefault("HYPOTHESIS_PROFILE", "default")


@pytest.fixture
def chaos_form(request):
    """``chaos_form(**short)``: the chaos run's settings, in its short form,
    or with ``--long`` its long form."""
    def form(**short):
        if request.config.getoption("--long"):
            return dict(short, **LONG_CHAOS)
        return short
    return form


@pytest_twisted.async_yield_fixture
async def opened():
    """``await opened(proc_or_port)``: a client connection to a chatd
    (process or port), closed after the test."""
    from tests.clients import connect
    conns = []

    async def open_(proc_or_port):
        port = proc_or_port if isinstance(proc_or_port, int) else proc_or_port.port
        c = await connect(port)
        conns.append(c)
        return c

    yield open_
    for c in conns:
        await c.close()

