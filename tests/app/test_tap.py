"""The command line: every option parses, validates and defaults as documented."""

import pytest
from twisted.python import usage

from chatd.app.config import DEFAULT_BACKLOG, Settings, with_backlog
from chatd.redis.target import RedisTarget
from chatd.app.tap import Options


def parse(*args):
    o = Options()
    o.parseOptions(list(args))
    return o.settings


def test_defaults_are_the_contract():
    s = parse()
    assert s == Settings()
    assert (s.port, s.redis, s.data_dir) == ("tcp:5000", None, "chatd-data")
    assert (s.redis_timeout, s.dedup_window, s.max_line, s.max_message) == (2, 5, 65536, 16384)
    assert (s.inbox_limit, s.inbox_ttl, s.ref_ttl) == (10000, 30 * 86400, 86400)
    assert (s.auth_timeout, s.keepalive, s.idle_timeout) == (30, 60, 300)
    assert s.registration == "open"


def test_values_and_units():
    s = parse("-p", "5001", "--listen", "tcp:6000:interface=127.0.0.1", "--listen", "7000",
              "--redis-timeout", "500ms", "--dedup-window", "0", "--max-line", "128k",
              "--max-message", "1k", "--inbox-limit", "5", "--inbox-ttl", "2d",
              "--ref-ttl", "1h", "--auth-timeout", "10", "--keepalive", "2m",
              "--idle-timeout", "10m", "--rate-limit", "0", "--output-limit", "2M")
    assert s.port == "tcp:5001"
    assert s.listen == ("tcp:6000:interface=127.0.0.1", "tcp:7000")
    assert s.redis_timeout == 0.5 and s.dedup_window == 0
    assert s.max_line == 128 * 1024 and s.max_message == 1024
    assert s.inbox_limit == 5 and s.inbox_ttl == 2 * 86400 and s.ref_ttl == 3600
    assert (s.auth_timeout, s.keepalive, s.idle_timeout) == (10, 120, 600)
    assert s.rate_limit == 0 and s.output_limit == 2 << 20


@pytest.mark.parametrize("url, target", [
    ("redis://localhost:6380/2", RedisTarget(host="localhost", port=6380, db=2)),
    ("redis://:pw@10.0.0.5", RedisTarget(host="10.0.0.5", password="pw")),
    ("redis://user:p%40ss@h:1/0", RedisTarget(host="h", port=1, username="user", password="p@ss")),
    ("rediss://h:6379/0", RedisTarget(host="h", tls=True)),
    ("unix:///run/redis.sock?db=3", RedisTarget(path="/run/redis.sock", db=3)),
])
def test_redis_urls(url, target):
    assert parse("--redis", url).redis == target


@pytest.mark.parametrize("args, words", [
    (["--port", "99999"], ["--port", "out of range"]),
    (["--port", "nonsense"], ["--port"]),
    (["--port", "bogus:123"], ["--port"]),
    (["--listen", "nope"], ["--listen"]),
    (["--redis", "http://x"], ["--redis", "scheme"]),
    (["--redis", "redis://h/x"], ["--redis", "database"]),
    (["--redis", "unix://relative.sock"], ["--redis", "absolute"]),
    (["--redis-timeout", "soon"], ["--redis-timeout", "duration"]),
    (["--redis-timeout", "0"], ["--redis-timeout"]),
    (["--max-line", "10"], ["--max-line", "at least"]),
    (["--max-message", "1M"], ["--max-message", "--max-line"]),
    (["--inbox-limit", "many"], ["--inbox-limit", "whole number"]),
    (["--rate-limit", "-1"], ["--rate-limit"]),
    (["--keepalive", "5m", "--idle-timeout", "1m"], ["--idle-timeout", "--keepalive"]),
    (["--keepalive", "1m", "--idle-timeout", "1m"], ["--idle-timeout", "--keepalive"]),
    (["--registration", "closed"], ["--registration", "open, claim or proof"]),
    (["--registration", "proof"], ["--registration-secret-file"]),
    (["--registration-secret-file", "/nonexistent/secret"], ["--registration-secret-file"]),
])
def test_bad_values_name_the_option(args, words):
    with pytest.raises(usage.UsageError) as e:
        parse(*args)
    for w in words:
        assert w in str(e.value), str(e.value)


@pytest.mark.parametrize("args, keepalive, idle", [
    (["--idle-timeout", "30s"], 15, 30),        # alone and short: ping at half of it
    (["--idle-timeout", "100s"], 50, 100),
    (["--idle-timeout", "10m"], 60, 600),       # alone and long: the default ping
    (["--keepalive", "10m"], 600, 1200),        # alone and long: idle at twice it
    (["--keepalive", "20s"], 20, 300),
    (["--keepalive", "20s", "--idle-timeout", "30s"], 20, 30),  # an explicit pair is kept
])
def test_one_liveness_option_alone_works(args, keepalive, idle):
    s = parse(*args)
    assert (s.keepalive, s.idle_timeout) == (keepalive, idle)


def test_secret_file_loses_one_trailing_newline(tmp_path):
    p = tmp_path / "secret"
    key = b"k" * 32
    p.write_bytes(key + b"\n\n")
    p.chmod(0o600)
    s = parse("--registration", "proof", "--registration-secret-file", str(p))
    assert s.registration_secret == key + b"\n"
    p.write_bytes(key + b"\r\n")  # written on Windows, or with echo -e
    assert parse("--registration-secret-file", str(p)).registration_secret == key
    p.write_bytes(b"\n")
    with pytest.raises(usage.UsageError):
        parse("--registration-secret-file", str(p))


@pytest.mark.parametrize("given, used", [
    ("tcp:5000", "tcp:5000:backlog=%d" % DEFAULT_BACKLOG),
    ("tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1:backlog=%d" % DEFAULT_BACKLOG),
    ("ssl:5443:privateKey=k.pem", "ssl:5443:privateKey=k.pem:backlog=%d" % DEFAULT_BACKLOG),
    ("tcp:5000:backlog=50", "tcp:5000:backlog=50"),
    ("tcp:5000:backlog=4096:interface=::", "tcp:5000:backlog=4096:interface=::"),
    ("unix:/run/chatd.sock", "unix:/run/chatd.sock"),
])
def test_listen_backlog_default(given, used):
    """A tcp or ssl listener that names no backlog gets DEFAULT_BACKLOG
    (reconnect storms), one that names it keeps it."""
    assert with_backlog(given) == used
