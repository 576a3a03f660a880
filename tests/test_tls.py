"""Tests for kms.tls: dev certificate generation, loading errors, and real handshakes on 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import stat
import warnings
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.threads import deferToThread
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from kms.tls import generate_dev_certificate, server_context_factory


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class GenerateTests(TestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()) / "tls"
        self.cert = self.directory / "server.pem"
        self.key = self.directory / "server.key"

    def test_creates_files_with_exact_modes(self) -> None:
        """Key 0600 and certificate 0644 whatever the umask; a new parent directory is 0700."""
        old = os.umask(0o077)
        self.addCleanup(os.umask, old)
        self.assertTrue(generate_dev_certificate(self.cert, self.key))
        self.assertEqual(mode(self.key), 0o600)
        self.assertEqual(mode(self.cert), 0o644)
        self.assertEqual(mode(self.directory), 0o700)
        self.assertEqual(sorted(p.name for p in self.directory.iterdir()), ["server.key", "server.pem"])

    def test_certificate_contents(self) -> None:
        """Self-signed EC P-256, names and addresses as SANs, not a CA, valid from now for ``days``."""
        generate_dev_certificate(
            self.cert,
            self.key,
            hostnames=["mail.example.test", "localhost"],
            addresses=["192.0.2.1"],
            days=30,
        )
        cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        key = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.assertEqual(key.curve.name, "secp256r1")
        self.assertEqual(cert.public_key(), key.public_key())
        self.assertEqual(cert.issuer, cert.subject)
        self.assertEqual(
            cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "mail.example.test"
        )
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["mail.example.test", "localhost"])
        self.assertEqual(san.get_values_for_type(x509.IPAddress), [ipaddress.ip_address("192.0.2.1")])
        self.assertFalse(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        now = datetime.datetime.now(datetime.UTC)
        self.assertLess(cert.not_valid_before_utc, now)
        lifetime = cert.not_valid_after_utc - now
        self.assertGreater(lifetime, datetime.timedelta(days=29, hours=23))
        self.assertLessEqual(lifetime, datetime.timedelta(days=30))

    def test_default_names(self) -> None:
        generate_dev_certificate(self.cert, self.key)
        cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )

    def test_idempotent(self) -> None:
        """A second run keeps the existing pair untouched and says so."""
        self.assertTrue(generate_dev_certificate(self.cert, self.key))
        before = (self.cert.read_bytes(), self.key.read_bytes())
        self.assertFalse(generate_dev_certificate(self.cert, self.key))
        self.assertEqual((self.cert.read_bytes(), self.key.read_bytes()), before)

    def test_lone_file_is_never_overwritten(self) -> None:
        """A key without its certificate may be a real one behind a config typo: refuse, keep it."""
        for present, missing in [(self.key, self.cert), (self.cert, self.key)]:
            with self.subTest(present=present.name):
                self.directory.mkdir(parents=True, exist_ok=True)
                present.write_bytes(b"precious")
                error = self.assertRaises(ValueError, generate_dev_certificate, self.cert, self.key)
                self.assertIn(str(missing), str(error))
                self.assertEqual(present.read_bytes(), b"precious")
                self.assertFalse(missing.exists())
                present.unlink()

    def test_bad_arguments(self) -> None:
        self.assertRaises(ValueError, generate_dev_certificate, self.cert, self.key, addresses=["nope"])
        self.assertRaises(ValueError, generate_dev_certificate, self.cert, self.key, hostnames=[])
        self.assertFalse(self.key.exists())


class ContextFactoryTests(TestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.cert = self.directory / "server.pem"
        self.key = self.directory / "server.key"
        generate_dev_certificate(self.cert, self.key)

    def test_loads_generated_pair(self) -> None:
        options = server_context_factory(self.cert, self.key)
        self.assertIsInstance(options, CertificateOptions)
        self.assertIsNotNone(options.getContext())

    def assertRefused(self, certificate: Path, private_key: Path, *fragments: str) -> None:
        error = self.assertRaises(ValueError, server_context_factory, certificate, private_key)
        for fragment in fragments:
            self.assertIn(fragment, str(error))

    def test_missing_files(self) -> None:
        missing = self.directory / "missing.pem"
        self.assertRefused(missing, self.key, "cannot read TLS certificate", str(missing), "No such file")
        self.assertRefused(self.cert, missing, "cannot read TLS private key", str(missing))

    def test_unreadable_file(self) -> None:
        """A directory where the key should be is an unreadable file, not a crash."""
        self.assertRefused(self.cert, self.directory, "cannot read TLS private key", str(self.directory))

    def test_garbage(self) -> None:
        junk = self.directory / "junk"
        junk.write_bytes(b"not PEM at all\n")
        self.assertRefused(junk, self.key, "no valid PEM certificate", str(junk))
        self.assertRefused(self.cert, junk, "cannot load TLS private key", str(junk))

    def test_key_and_certificate_swapped(self) -> None:
        self.assertRefused(self.key, self.cert, "no valid PEM certificate", str(self.key))

    def test_encrypted_key(self) -> None:
        key = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        encrypted = self.directory / "encrypted.key"
        encrypted.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pass"),
            )
        )
        self.assertRefused(self.cert, encrypted, "is encrypted", str(encrypted))

    def test_mismatched_key(self) -> None:
        other = self.directory / "other"
        generate_dev_certificate(other / "c.pem", other / "k.key")
        self.assertRefused(self.cert, other / "k.key", "does not match", str(self.cert))


def make_chain(directory: Path) -> tuple[Path, Path, Path]:
    """A root CA, an intermediate and a leaf for localhost; returns (root, leaf+intermediate, leaf key)."""
    now = datetime.datetime.now(datetime.UTC)

    def issue(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: str,
        signer: ec.EllipticCurvePrivateKey,
        ca: bool,
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
            )
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    root_key, middle_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = issue("kms test root", root_key, "kms test root", root_key, ca=True)
    middle = issue("kms test intermediate", middle_key, "kms test root", root_key, ca=True)
    leaf = issue("localhost", leaf_key, "kms test intermediate", middle_key, ca=False)
    pem = serialization.Encoding.PEM
    directory.mkdir(parents=True)
    (directory / "root.pem").write_bytes(root.public_bytes(pem))
    (directory / "chain.pem").write_bytes(leaf.public_bytes(pem) + middle.public_bytes(pem))
    (directory / "leaf.key").write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return directory / "root.pem", directory / "chain.pem", directory / "leaf.key"


class Echo(Protocol):
    """Echoes bytes; tells the test when the connection is really gone so the reactor is left clean."""

    def __init__(self, lost: Deferred[None]) -> None:
        self.lost = lost

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class StartTLSEcho(LineReceiver):
    """Plaintext until ``STARTTLS``, then the same options as implicit TLS, then echo."""

    def __init__(self, options: CertificateOptions, lost: Deferred[None]) -> None:
        self.options = options
        self.lost = lost

    def lineReceived(self, line: bytes) -> None:
        if line == b"STARTTLS":
            self.sendLine(b"GO")
            self.transport.startTLS(self.options)  # type: ignore[union-attr]
        else:
            self.sendLine(line)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class Server(Factory):
    def __init__(self, make: Callable[[Deferred[None]], Protocol]) -> None:
        self.make = make
        self.lost: list[Deferred[None]] = []

    def buildProtocol(self, addr: object) -> Protocol:
        lost: Deferred[None] = Deferred()
        self.lost.append(lost)
        protocol = self.make(lost)
        protocol.factory = self
        return protocol


def client_context(cafile: Path, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    if maximum is not None:
        context.maximum_version = maximum
    return context


def tls_echo(port: int, context: ssl.SSLContext, server_hostname: str) -> tuple[str | None, bytes]:
    """Blocking client, run in a thread: handshake, send, read the echo."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            tls.sendall(b"ping")
            return tls.version(), tls.recv(4)


def starttls_echo(port: int, context: ssl.SSLContext) -> tuple[str | None, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"STARTTLS\r\n")
        received = b""
        while not received.endswith(b"\r\n"):
            received += raw.recv(1)
        if received != b"GO\r\n":
            raise AssertionError(received)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"ping\r\n")
            return tls.version(), tls.recv(6)


class HandshakeTests(TestCase):
    """Real TLS over 127.0.0.1 with the stdlib client, verifying like a mail client would."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.cert = self.directory / "server.pem"
        self.key = self.directory / "server.key"
        generate_dev_certificate(self.cert, self.key)

    @inlineCallbacks
    def listen(self, factory: Factory[Any]) -> Generator[Deferred[Any], Any, int]:
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port  # type: ignore[no-any-return]

    @inlineCallbacks
    def implicit_tls(
        self, options: CertificateOptions, context: ssl.SSLContext, server_hostname: str = "localhost"
    ) -> Generator[Deferred[Any], Any, tuple[str | None, bytes]]:
        server = Server(Echo)
        port = yield self.listen(TLSMemoryBIOFactory(options, False, server))
        try:
            result = yield deferToThread(tls_echo, port, context, server_hostname)
        finally:
            yield gatherResults(server.lost)
        return result  # type: ignore[no-any-return]

    @inlineCallbacks
    def test_implicit_tls_verifies_localhost(self) -> Generator[Deferred[Any], Any, None]:
        """The generated certificate, used as the client's only CA, verifies for ``localhost``."""
        options = server_context_factory(self.cert, self.key)
        version, echoed = yield self.implicit_tls(options, client_context(self.cert))
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(echoed, b"ping")

    @inlineCallbacks
    def test_ip_address_san(self) -> Generator[Deferred[Any], Any, None]:
        options = server_context_factory(self.cert, self.key)
        _, echoed = yield self.implicit_tls(options, client_context(self.cert), "127.0.0.1")
        self.assertEqual(echoed, b"ping")

    @inlineCallbacks
    def test_wrong_name_fails_verification(self) -> Generator[Deferred[Any], Any, None]:
        """Proof that the client really verifies: a name not in the SANs is refused."""
        options = server_context_factory(self.cert, self.key)
        error = yield self.assertFailure(
            self.implicit_tls(options, client_context(self.cert), "mail.example.test"),
            ssl.SSLCertVerificationError,
        )
        self.assertIn("mail.example.test", str(error))

    @inlineCallbacks
    def test_tls_1_2_accepted(self) -> Generator[Deferred[Any], Any, None]:
        options = server_context_factory(self.cert, self.key)
        version, _ = yield self.implicit_tls(options, client_context(self.cert, ssl.TLSVersion.TLSv1_2))
        self.assertEqual(version, "TLSv1.2")

    @inlineCallbacks
    def test_tls_1_1_refused_by_the_server(self) -> Generator[Deferred[Any], Any, None]:
        """A TLS 1.1-only client gets the server's protocol_version alert.

        Control first: the same client completes TLS 1.1 once the server's context is loosened, so
        the refusal below is the server's doing, not the client declining to try.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            legacy = ssl.TLSVersion.TLSv1_1
        context = client_context(self.cert, legacy)
        context.minimum_version = legacy
        context.set_ciphers("DEFAULT:@SECLEVEL=0")

        options = server_context_factory(self.cert, self.key)
        loosened = CertificateOptions(
            privateKey=options.privateKey,
            certificate=options.certificate,
            insecurelyLowerMinimumTo=TLSVersion.TLSv1_1,
        )
        loosened.getContext().set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        try:
            version, _ = yield self.implicit_tls(loosened, context)
        except ssl.SSLError as error:
            raise SkipTest(f"this OpenSSL cannot do TLS 1.1 at all: {error}") from None
        self.assertEqual(version, "TLSv1.1")

        refusal = yield self.assertFailure(self.implicit_tls(options, context), ssl.SSLError)
        self.assertIn("ALERT_PROTOCOL_VERSION", str(refusal))

    @inlineCallbacks
    def test_intermediates_are_sent(self) -> Generator[Deferred[Any], Any, None]:
        """A client that trusts only the root verifies the leaf: the intermediate came from the server."""
        root, chain, key = make_chain(self.directory / "chain")
        options = server_context_factory(chain, key)
        _, echoed = yield self.implicit_tls(options, client_context(root))
        self.assertEqual(echoed, b"ping")

    @inlineCallbacks
    def test_starttls(self) -> Generator[Deferred[Any], Any, None]:
        """The same options upgrade a plaintext connection with ``transport.startTLS``."""
        options = server_context_factory(self.cert, self.key)
        server = Server(lambda lost: StartTLSEcho(options, lost))
        port = yield self.listen(server)
        try:
            version, echoed = yield deferToThread(starttls_echo, port, client_context(self.cert))
        finally:
            yield gatherResults(server.lost)
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(echoed, b"ping\r\n")
