"""
The Redis layer: connections to a Redis/Valkey store, with a deadline on
every call. It knows neither the store's layout nor the hub nor sessions;
it raises :mod:`chatd.errors`.

- ``client``: :class:`~chatd.redis.client.RedisClient`, one pipelined
  connection, deadlines kept by one watchdog, the function library loaded
  on every connection
- ``adapter``: every use of txredisapi's internals, and nothing else does
- ``resp``: the RESP command encoder
- ``acks``: ``--store-acks``, group-committed ``WAIT``
- ``cluster``: Redis Cluster, a client per primary, routing by slot
- ``sentinel``: finding the primary through Sentinel, following failovers
- ``subscriber``: sharded pub/sub connections (one per primary on a cluster)
- ``target``, ``tls``: the ``--redis`` URLs and TLS to the store
- ``stats``: the store client's counters, read by :mod:`chatd.ops.metrics`
- ``embedded``, ``embedded_dir``, ``embedded_child``: the child
  ``valkey-server`` of a node without ``--redis``
"""
