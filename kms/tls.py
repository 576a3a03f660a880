"""TLS for every listener: one server context from ``[tls]``, and a self-signed certificate for development.

The same `CertificateOptions` serves implicit-TLS listeners (wrap the factory in
``twisted.protocols.tls.TLSMemoryBIOFactory(options, False, factory)``) and STARTTLS/STLS
(``transport.startTLS(options)``).  Everything is loaded and checked once at start, so a bad
certificate stops the server with a clear message instead of failing the first handshake.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet.ssl import CertificateOptions, TLSVersion

from kms.fsutil import replace_file


def _read(path: Path, what: str) -> bytes:
    """The file's bytes, or ValueError naming it: the message an admin sees when start fails."""
    try:
        return path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read TLS {what} {path}: {error.strerror or error}") from None


def server_context_factory(certificate: Path, private_key: Path) -> CertificateOptions:
    """Server options from a PEM chain (leaf first, then intermediates) and its key; TLS 1.2 or later.

    ValueError, naming the file, for a missing or unreadable file, no certificate, an encrypted or
    unsupported key, or a key that does not belong to the first certificate.
    """
    chain_pem = _read(certificate, "certificate")
    key_pem = _read(private_key, "private key")
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise ValueError(f"no valid PEM certificate in {certificate}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ValueError(f"TLS private key {private_key} is encrypted; kms needs it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm) as error:
        raise ValueError(f"cannot load TLS private key {private_key}: {error}") from None
    if key.public_key() != chain[0].public_key():
        raise ValueError(
            f"TLS private key {private_key} does not match the first certificate in {certificate}"
        )
    try:
        options = CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),  # type: ignore[arg-type]
            certificate=crypto.X509.from_cryptography(chain[0]),
            extraCertChain=[crypto.X509.from_cryptography(cert) for cert in chain[1:]],
            raiseMinimumTo=TLSVersion.TLSv1_2,
        )
        options.getContext()
    except (TypeError, SSL.Error) as error:
        raise ValueError(f"TLS certificate {certificate} cannot be used: {error}") from None
    return options


def generate_dev_certificate(
    certificate: Path,
    private_key: Path,
    hostnames: Sequence[str] = ("localhost",),
    addresses: Sequence[str] = ("127.0.0.1", "::1"),
    days: int = 825,
) -> bool:
    """Create a self-signed EC P-256 certificate for development; False if both files already exist.

    Refuses (ValueError) when only one of the two exists: that may be a real key or certificate
    whose partner is misconfigured, and overwriting it would destroy it.
    """
    if certificate.exists() and private_key.exists():
        return False
    if certificate.exists() or private_key.exists():
        present, missing = (certificate, private_key) if certificate.exists() else (private_key, certificate)
        raise ValueError(f"{present} exists but {missing} does not; not overwriting it")
    if not hostnames:
        raise ValueError("a development certificate needs at least one host name")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    now = datetime.datetime.now(datetime.UTC)
    alternative_names: list[x509.GeneralName] = [x509.DNSName(host) for host in hostnames]
    alternative_names += [x509.IPAddress(ipaddress.ip_address(address)) for address in addresses]
    subject_key = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(subject_key, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(subject_key), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    private_key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    certificate.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    replace_file(private_key, key_pem, 0o600)  # a reader never sees half a key
    replace_file(certificate, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return True
