"""
``--log-format json``: one JSON object per log event and per line, for log
shippers (Loki, Elasticsearch, journald's JSON mode, ...).

chatd logs through ``twisted.logger`` with named fields
(``log.info("... {device} ...", device=...)``); twistd's default observer
prints those as text. This module is twistd's own way of choosing another
observer (``twistd --logger chatd.ops.logs.json_observer chatd ...``); the chatd
option ``--log-format json`` only sets that for the operator.

Each line: ``time`` (ISO 8601, UTC), ``level``, ``namespace``, ``message``
(the formatted text), the event's own scalar fields by name, and
``traceback`` for a failure. No other field is copied: an event's objects
(a connection, a service) are not written. What chatd logs never holds a
token or a message text (tests/test_logs.py checks a run's log for them).
"""

import json
import sys
from datetime import datetime, timezone

from twisted.logger import ILogObserver, formatEvent
from zope.interface import implementer

_logfile = None  # twistd's --logfile, when --log-format json chose this observer

#: fields of legacy (twisted.python.log) events that repeat what is already written
_SKIP = frozenset(("message", "format", "isError", "system", "time", "why", "failure"))
_SCALARS = (str, int, float, bool, type(None))


def use_json(twistd_options):
    """Make twistd use :func:`json_observer` (called while twistd parses the
    chatd options, before it starts logging). Not under twistd: nothing."""
    global _logfile
    if twistd_options is None or "logger" not in twistd_options:
        return
    if twistd_options["logger"] is None:
        twistd_options["logger"] = "chatd.ops.logs.json_observer"  # twistd imports it by name
    _logfile = twistd_options.get("logfile")


def json_observer():
    """The observer factory twistd calls (``--logger chatd.ops.logs.json_observer``):
    writes to twistd's ``--logfile`` if one was given with ``--log-format
    json``, else to stdout."""
    if _logfile and _logfile != "-":
        from twisted.python.logfile import LogFile
        return JSONLinesObserver(LogFile.fromFullPath(_logfile))
    return JSONLinesObserver(sys.stdout)


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one line of JSON."""

    def __init__(self, out):
        self.out = out

    def __call__(self, event):
        self.out.write(event_line(event))
        self.out.flush()


def event_line(event):
    """One event as a line of JSON (newline included)."""
    level = event.get("log_level")
    record = {
        "time": datetime.fromtimestamp(event.get("log_time") or 0, timezone.utc)
        .isoformat(timespec="milliseconds"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace") or event.get("system") or "-",
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _SKIP or key in record:
            continue
        if isinstance(value, _SCALARS):
            record[key] = value
    failure = event.get("log_failure") or event.get("failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = repr(failure)
    return json.dumps(record, ensure_ascii=False, default=repr) + "\n"
