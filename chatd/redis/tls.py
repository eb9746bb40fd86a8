"""
TLS to the store (``rediss://``): the client options that check the server's
certificate, and the CA files that ``--redis-ca-file`` names.
"""

from twisted.internet import ssl


def tls_options(target, log=None):
    """The TLS client options of a ``rediss://`` target: the server's
    certificate must be valid for the target's host name (or IP address) and
    signed by a CA of ``target.tls_ca_file`` (else one the system trusts).
    Only ``tls_verify=False`` (``--redis-tls-insecure``) turns that off, and
    it is logged as critical: anyone on the path can then read and change
    every message."""
    if not target.tls_verify:
        if log is not None:
            log.critical(
                "--redis-tls-insecure: the certificate of the store {store} is NOT "
                "checked; anyone on the network path can read and change every "
                "message and token. Use it for tests only.", store=target.describe())
        return ssl.CertificateOptions(verify=False)
    trust = None
    if target.tls_ca_file:
        trust = ssl.trustRootFromCertificates(load_certificates(target.tls_ca_file))
    return ssl.optionsForClientTLS(target.host, trustRoot=trust)


def load_certificates(path):
    """Every PEM certificate of a file (a CA bundle); ValueError if none."""
    with open(path, "rb") as f:
        data = f.read()
    marker = b"-----END CERTIFICATE-----"
    pems = [part + marker for part in data.split(marker) if b"-----BEGIN CERTIFICATE" in part]
    if not pems:
        raise ValueError("%s holds no PEM certificate" % path)
    return [ssl.Certificate.loadPEM(pem) for pem in pems]
