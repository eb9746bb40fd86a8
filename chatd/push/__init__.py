"""
Push wake-ups (contract 1.2): waking a device that is not connected, through
a push gateway that speaks the Matrix Push Gateway API v1.

``gateway``
    the HTTP client of the gateway (treq on a persistent connection pool:
    keep-alive, a bound on requests in flight, a deadline on each) and the
    request body
``waker``
    which wake-ups this node sends: the due ones it made itself (at once),
    those it finds in the store's due index (a scan, for those of nodes that
    died), each claimed with a lease (:mod:`chatd.store.pushsteps`); the
    answer's consequences (coalescing, retries, a rejected pushkey)

Between the hub and the process shell: it uses the store; the hub hands it
work through its ``pusher`` (an object with ``due(device, delay_ms)``); the
sessions know nothing of it.
"""
