"""
The chaos harness's receipts (contract 1.2): what the senders were pushed,
checked against what was sent, accepted and acked (tests/system/chaos.py).

Most devices opt in (``"receipts": "true"`` on every register and
reconnect); the others must never see a receipt. Receivers ack as always,
and now and then send ``read`` for the last message of one sender. The
checks:

* a receipt only to a device that opted in;
* on one connection, for one (receiver, status), each receipt's ``upto``
  is higher than the last one's: a receipt pushed once per connection,
  ``upto`` never lower than one already seen there;
* one (receiver, status, upto) is one receipt (one id): made once, even if
  a store step was retried or a node died between a Cluster's two steps;
* ``upto`` is the id of a message this device sent to that receiver and got
  accepted (a read's too);
* at the end (every message acked, so every ack's step made its receipt):
  for each (sender that opted in, receiver) the highest ``delivered``
  ``upto`` seen is the highest id of the sender's accepted messages to that
  receiver: no receipt lost.

Receipts are pushes in the sender's sequence: :class:`chaos.Tracker` checks
their ids with the messages' (no gap, no repeat on one connection, the same
bytes when pushed again).
"""

from collections import Counter

STATUSES = ("delivered", "read")


class ReceiptChecks:
    """What the receipt pushes said; :meth:`check` compares it with the
    sends at the end. ``anomaly(kind, detail)`` is the tracker's."""

    def __init__(self, anomaly):
        self.anomaly = anomaly
        self.opted = set()     # devices that opted in
        self.pushes = Counter()           # status -> receipt pushes seen
        self.reads_sent = 0
        self.last = {}         # (serial, receiver, status) -> last upto on that connection
        self.made = {}         # (sender, receiver, status, upto) -> receipt id
        self.highest = {}      # (sender, receiver, status) -> highest upto seen

    def push(self, device, serial, obj):
        """A receipt pushed to ``device`` on connection ``serial`` (its id
        already checked as a push in the device's sequence)."""
        try:
            receiver, status, rid = obj["receiver"], obj["status"], int(obj["id"])
            upto = int(obj["upto"])
            int(obj["at"])
        except (KeyError, TypeError, ValueError):
            self.anomaly("malformed_receipt", obj)
            return
        if status not in STATUSES:
            self.anomaly("malformed_receipt", obj)
            return
        self.pushes[status] += 1
        if device not in self.opted:
            self.anomaly("receipt_to_a_device_that_did_not_opt_in", (device, obj))
        key = (serial, receiver, status)
        last = self.last.get(key)
        if last is not None and upto <= last:
            self.anomaly("receipt_upto_not_rising_on_one_connection",
                         (device, serial, receiver, status, last, upto))
        self.last[key] = upto if last is None else max(last, upto)
        made = (device, receiver, status, upto)
        first = self.made.setdefault(made, rid)
        if first != rid:
            self.anomaly("receipt_made_twice", (made, first, rid))
        pair = (device, receiver, status)
        self.highest[pair] = max(self.highest.get(pair, 0), upto)

    def missing(self, sents):
        """(sender, receiver, highest accepted id, highest delivered upto
        seen) for each pair of an opted-in sender whose receipts do not
        cover its accepted messages yet."""
        want = {}
        for s in sents:
            if s.status == "accepted" and s.sender in self.opted:
                pair = (s.sender, s.receiver)
                want[pair] = max(want.get(pair, 0), int(s.id))
        return [(snd, rcv, top, self.highest.get((snd, rcv, "delivered"), 0))
                for (snd, rcv), top in sorted(want.items())
                if self.highest.get((snd, rcv, "delivered"), 0) < top]

    def check(self, sents):
        """The checks that need every send: receipts for no message, and
        receipts missing. Returns the missing ones."""
        ids = {}
        for s in sents:
            if s.status == "accepted":
                ids.setdefault((s.sender, s.receiver), set()).add(int(s.id))
        for (sender, receiver, status, upto) in self.made:
            if upto not in ids.get((sender, receiver), ()):
                self.anomaly("receipt_for_no_message", (sender, receiver, status, upto))
        missing = self.missing(sents)
        for m in missing:
            self.anomaly("receipt_missing", m)
        return missing
