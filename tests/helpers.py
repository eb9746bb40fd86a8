"""
Test helpers: deadlines and waits in the reactor, pairs of registered
clients, a self-signed certificate, ``chatd-admin`` as a subprocess.
(Clients are in tests/clients.py, real processes in tests/fixtures/.)
"""

import datetime
import ipaddress
import os
import socket
import subprocess
import sys
import time

DEADLINE = 10.0  # default seconds any single wait in a test may take


# -- waits ------------------------------------------------------------------------------

async def with_deadline(d, seconds=DEADLINE, what="a reply"):
    from twisted.internet import defer, reactor
    try:
        return await d.addTimeout(seconds, reactor)
    except defer.TimeoutError:
        raise AssertionError("no %s within %gs" % (what, seconds)) from None


async def pair(chatd, clients, target=None, **settings):
    """A node (on ``target``, or the session store) with alice and bob
    registered on it: (node, alice's client, bob's client)."""
    node = await chatd(target=target, **settings)
    a = await clients(node)
    b = await clients(node)
    await a.register("alice")
    await b.register("bob")
    return node, a, b


async def registered(clients, node, device):
    c = await clients(node)
    await c.register(device)
    return c


def polling(predicate, timeout, what):
    """The loop of :func:`wait_until` and ``tests.fixtures.process.wait_for``:
    calls ``predicate`` and yields None while it is false, then its value;
    fails after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            yield value
            return
        if time.monotonic() > end:
            raise AssertionError("%s did not happen within %gs" % (what, timeout))
        yield


async def wait_until(predicate, timeout=DEADLINE, what="the condition", interval=0.01):
    """Poll ``predicate`` (for state with no event to await, e.g. an ack in
    the store) until it is true, without blocking the reactor; its value, or
    fail after ``timeout``."""
    from twisted.internet import reactor, task
    for value in polling(predicate, timeout, what):
        if value:
            return value
        await task.deferLater(reactor, interval, lambda: None)


async def pass_time(seconds):
    """Let wall-clock time pass when time itself is what a test is about
    (a window, a refill); never to wait for an event."""
    from twisted.internet import reactor, task
    await task.deferLater(reactor, seconds, lambda: None)


async def connect_sleeper(node, device):
    """A raw client with a small receive buffer, registered on ``node`` as
    ``device``, that never reads (a slow consumer to be): its socket, for
    the test to close."""
    sleeper = socket.socket()
    try:
        sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sleeper.connect(("127.0.0.1", node.port))
        sleeper.sendall(b'{"register":"true","sender":"%s"}\n' % device.encode())
        await wait_until(lambda: device in node.hub.sessions)
    except BaseException:
        sleeper.close()
        raise
    return sleeper


async def send_until_cut(sender, node, device):
    """Send big messages to ``device`` (connected, not reading) until chatd
    cuts it as a slow consumer; how many were accepted."""
    text = "z" * 16000
    n = 0
    while device in node.hub.sessions:
        assert n < 2000, "the slow consumer was never cut"
        sender.send({"message": "%d %s" % (n, text), "receiver": device})
        await sender.expect("accepted")
        n += 1
    return n


# -- a certificate, an operator's tool -------------------------------------------------

def make_certificate(directory, name="localhost"):
    """A self-signed certificate for ``name`` and 127.0.0.1; the paths of
    key.pem and cert.pem."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path = os.path.join(directory, "key.pem")
    cert_path = os.path.join(directory, "cert.pem")
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def ssl_port(key_path, cert_path):
    return "ssl:0:privateKey=%s:certKey=%s:interface=127.0.0.1" % (key_path, cert_path)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_admin(*args, data_dir=None, script=False):
    """(exit code, stdout, stderr) of ``chatd-admin`` (``python -m chatd.ops.admin``,
    or the installed console script)."""
    where = ["--data-dir", data_dir] if data_dir else []
    if script:
        argv = [os.path.join(os.path.dirname(sys.executable), "chatd-admin")]
    else:
        argv = [sys.executable, "-m", "chatd.ops.admin"]
    p = subprocess.run(argv + where + list(args), cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    return p.returncode, p.stdout, p.stderr


def unix_proxy_factory(unix_path):
    """A server factory that pipes each connection to a new connection to a
    unix socket (a TLS end in front of a store that has no TLS of its own)."""
    from twisted.internet import reactor
    from twisted.protocols import portforward

    class ToUnix(portforward.ProxyServer):
        def connectionMade(self):
            self.transport.pauseProducing()
            client = self.clientProtocolFactory()
            client.setServer(self)
            reactor.connectUNIX(unix_path, client)

    factory = portforward.ProxyFactory(None, None)
    factory.protocol = ToUnix
    factory.noisy = False
    return factory
