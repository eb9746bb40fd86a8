"""
chatd.wire: the client connections, from bytes to the hub's calls.

- ``packets``: the pure packet codec (parse a client line, build server lines, ids).
- ``session``: ``Session``, one per connection: dispatch, rate, answers, closing.
- ``replies``: a session's replies in packet order, and its packets in flight.
- ``liveness``: a session's deadlines (auth timeout, keepalive/idle, close grace).
- ``output``: a session's output and flow control; one write per connection per turn.
- ``framing``: the small interface between a session and its framing, and the stream under it.
- ``lines``: the TCP framing (plain, TLS, unix socket): one packet per line.
- ``websocket``: the WebSocket framing (one packet per text frame) and the web site.
- ``factory``: ``ChatFactory``: what sessions share, admission caps, graceful shutdown.
- ``stats``: the connections' counters, held by the factory, read by ``chatd.ops.metrics``.
- ``ratelimit``: the token bucket of one connection.
- ``timers``: the timer wheel of every connection's deadlines.

It uses the hub (``chatd.hub``); the hub does not use it, but for the codec.
"""
