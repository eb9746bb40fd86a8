"""The --push-* options: defaults, values, and a start error naming the
option for each bad value."""

import pytest
from twisted.python import usage

from chatd.app.tap import Options


def parse(*args):
    o = Options()
    o.parseOptions(list(args))
    return o.settings


def test_defaults():
    s = parse()
    assert s.push_url is None
    assert (s.push_interval, s.push_unacked, s.push_timeout, s.push_retry_for) == (
        30, 15, 10, 3600)
    assert s.push_content == "none" and s.push_ca_file is None


def test_values(tmp_path):
    from tests.helpers import make_certificate
    _, cert = make_certificate(str(tmp_path))
    s = parse("--push-url", "https://push.example.com/_matrix/push/v1/notify",
              "--push-interval", "1m", "--push-unacked", "500ms", "--push-content", "sender",
              "--push-timeout", "3s", "--push-retry-for", "2h", "--push-ca-file", cert)
    assert s.push_url == "https://push.example.com/_matrix/push/v1/notify"
    assert (s.push_interval, s.push_unacked, s.push_timeout, s.push_retry_for) == (
        60, 0.5, 3, 7200)
    assert s.push_content == "sender" and s.push_ca_file == cert
    assert parse("--push-url", "none").push_url is None


@pytest.mark.parametrize("option,value", [
    ("push-url", "ftp://x/y"), ("push-url", "push.example.com"), ("push-url", "http://"),
    ("push-interval", "soon"), ("push-unacked", "0"), ("push-content", "text"),
    ("push-timeout", "-1"), ("push-retry-for", "1y"), ("push-ca-file", "/nonexistent.pem"),
])
def test_bad_values_name_the_option(option, value):
    with pytest.raises(usage.UsageError) as e:
        parse("--" + option, value)
    assert "--" + option in str(e.value)
