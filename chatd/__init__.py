"""
chatd, a persistent mobile chat server. The packages, top to bottom (each
imports only those below it; ``tests/test_layers.py`` checks):

- :mod:`chatd.app`: the process shell (command line, settings, services, workers)
- :mod:`chatd.ops`: metrics, health, logs, ``chatd-admin``
- :mod:`chatd.wire`: the packet codec, sessions, framings, the chat page
- :mod:`chatd.hub`: binding, takeover, routing, presence, tokens
- :mod:`chatd.store`: the store's steps, its Lua, its layout, notifications
- :mod:`chatd.redis`: the Redis layer (client, Cluster, Sentinel, embedded valkey)
- :mod:`chatd.errors`, :mod:`chatd.netio`: the store's errors, fast socket writes

:mod:`chatd.client` is the terminal client; it uses only the packet codec.
"""
