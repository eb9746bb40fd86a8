"""
What operators see and use.

- ``metrics``: ``/metrics`` (Prometheus, read from the layers' own counters)
  and ``/health``
- ``logs``: ``--log-format json``
- ``admin``: ``chatd-admin`` (stats, inbox, revoke, purge)
"""
