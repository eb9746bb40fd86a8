"""The documents tell the truth: the protocol transcript replays against a live
server, and .ci/run runs the README's test command."""

import json
import os
import re

import pytest_twisted

from tests.helpers import with_deadline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLACEHOLDER = re.compile(r"<([a-zA-Z0-9-]+)>")


def transcript(name="transcript"):
    with open(os.path.join(ROOT, "docs", "protocol.rst"), encoding="utf-8") as f:
        text = f.read()
    block = text.split(".. %s starts" % name)[1].split(".. %s ends" % name)[0]
    steps = []
    for line in block.splitlines():
        m = re.match(r"^   ([A-Z])([<>]) (.*)$", line)
        if m:
            steps.append(m.groups())
    return steps


def match(template, line, bound):
    """Compare a server line with a template line; bind placeholders:
    ``"<name>"`` is any string (the same each time it appears), ``<ms>`` any
    positive integer."""
    expected = json.loads(re.sub(r"<ms>", "-1", re.sub(r'"<([a-zA-Z0-9-]+)>"', r'"\\u0000\1"',
                                                           template)))
    actual = json.loads(line)
    assert list(actual) == list(expected), (template, line)
    assert line == json.dumps(actual, separators=(",", ":"), ensure_ascii=False)
    for key, want in expected.items():
        got = actual[key]
        if want == -1:
            assert isinstance(got, int) and got > 0, (key, line)
        elif isinstance(want, str) and want.startswith("\0"):
            name = want[1:]
            assert bound.setdefault(name, got) == got, (name, got, bound[name])
        else:
            assert got == want, (key, got, want, line)


def test_transcript_is_there():
    steps = transcript()
    assert len(steps) > 10
    assert {who for who, _, _ in steps} == {"A", "B"}


@pytest_twisted.ensureDeferred
async def test_transcript_replays_against_a_live_server(chatd, clients):
    await replay(chatd, clients, "transcript")


@pytest_twisted.ensureDeferred
async def test_receipts_transcript_replays_against_a_live_server(chatd, clients):
    assert len(transcript("receipts transcript")) > 10
    await replay(chatd, clients, "receipts transcript")


async def replay(chatd, clients, name):
    node = await chatd()
    sessions, bound = {}, {}
    for who, direction, text in transcript(name):
        if who not in sessions:
            sessions[who] = await clients(node)
        c = sessions[who]
        if direction == ">":
            c.send(PLACEHOLDER.sub(lambda m: bound[m.group(1)], text) + "\r\n")  # as telnet does
        else:
            raw = await with_deadline(c.lines.get())
            match(text, raw.decode("utf-8"), bound)
    for c in sessions.values():
        assert await c.sync() == []


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, "README.rst"), encoding="utf-8") as f:
        readme = f.read()
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    # the README marks its test command; .ci/run extracts and runs that line
    m = re.search(r"\.\. test-command\n\n.*?::\n\n   ([^\n]+)\n", readme, re.S)
    assert m, "README.rst has no marked test command"
    assert "test-command" in ci and "README.rst" in ci
    assert m.group(1).strip().endswith("pytest")
