"""
Secrets: device tokens and registration proofs.

A token is 192 bits from the OS CSPRNG, URL-safe. The store only ever sees
its SHA-256 (a token is high-entropy, so a fast hash is enough: nothing can be
guessed from it), and tokens are compared as hashes in constant time.
"""

import hashlib
import hmac
import secrets

from chatd.wire.parsing import PacketError

TOKEN_BYTES = 24


def new_token():
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token):
    """What the store keeps instead of the token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def token_matches(token, *stored_hashes):
    """Constant-time check of a presented token against stored hashes (any
    of them)."""
    presented = token_hash(token)
    match = False
    for stored in stored_hashes:
        if not stored:
            continue
        if isinstance(stored, bytes):
            stored = stored.decode("ascii", "replace")
        match |= hmac.compare_digest(presented, stored)
    return match


def make_proof(secret, sender, expiry):
    """The registration ticket the phone-number verification service issues:
    ``"<expiry>:<hex HMAC-SHA256(secret, "<sender>:<expiry>")>"``."""
    return "%d:%s" % (expiry, _mac(secret, sender, str(expiry)))


def _mac(secret, sender, expiry_text):
    message = ("%s:%s" % (sender, expiry_text)).encode("utf-8")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def check_proof(secret, sender, proof, now, max_age=None):
    """The expiry (unix seconds) of ``proof`` when it is a valid, unexpired
    ticket for ``sender`` that expires within ``max_age`` seconds; else None.
    (A ticket "valid" until the year 33658 is as good as eternal: the issuer
    says how long a phone has to use it, and the server caps that.)"""
    if not isinstance(proof, str):
        return None
    expiry_text, sep, mac = proof.partition(":")
    if not sep or not expiry_text.isascii() or not expiry_text.isdigit() or len(expiry_text) > 12:
        return None
    expiry = int(expiry_text)
    if expiry <= now or (max_age is not None and expiry > now + max_age):
        return None
    # the MAC covers the expiry exactly as written in the ticket
    expected = _mac(secret, sender, expiry_text)
    # the contract says lowercase hex; compare_digest needs ASCII on both sides
    if not mac.isascii():
        return None
    return expiry if hmac.compare_digest(expected, mac) else None


def ticket_ms(settings, device, proof, now):
    """For a register: how long its proof ticket must be remembered as used
    (ms; 0 when registration needs no proof). PacketError forbidden when a
    proof is needed and this one is not valid for the id, or expires too late."""
    if settings.registration != "proof":
        return 0
    expiry = check_proof(settings.registration_secret, device, proof, now,
                         settings.proof_max_age)
    if expiry is None:
        raise PacketError(
            "forbidden", "register needs a valid proof \"<expiry>:<hex hmac>\" for this id "
            "that expires within %gs" % settings.proof_max_age, field="proof")
    return max(1, int((expiry - now) * 1000))
