"""
The store's own errors: what the hub and the sessions see when the store
cannot do what was asked. Raised by the Redis layer (:mod:`chatd.redis`),
answered by the sessions as ``unavailable``; nothing above the Redis layer
sees a Redis client's exceptions.
"""


class StoreUnavailable(Exception):
    """The store could not do what was asked in time; nothing can be assumed
    stored (a reply lost after the store acted is possible: clients retry with
    a ``ref``)."""


class StoreFull(StoreUnavailable):
    """The store refused a write because it is at its memory limit
    (``maxmemory``, policy ``noeviction``): nothing of it was stored."""
