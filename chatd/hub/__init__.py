"""
chatd.hub: who is bound where, routing, takeover, presence. No sockets.

- ``router``: ``Hub``, the registry and router of one node, and the ``Connection`` it is handed.
- ``binding``: register and reconnect (token rotation and reuse), claims, takeover, unbinding.
- ``delivery``: ``Delivery``, the push state of one bound connection (pushes, drain, acks).
- ``presence``: the claims of devices across nodes, and the notifications between them.
- ``tokens``: tokens, their hashes, and the proofs of ``--registration proof``.
- ``sweeper``: ``OutboxSweeper``, the periodic backstop that moves receipts left in outboxes (Redis Cluster).
"""
