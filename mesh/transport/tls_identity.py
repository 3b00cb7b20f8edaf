"""The data plane's TLS identity: each node's certificate is self-signed with its own Ed25519
node key, so the key in the certificate *is* the peer id (checked by `peer_id_in_certificate`)."""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from ..identity import NodeIdentity, peer_id_of, public_key_bytes
from .seam import TransportError


def _certificate_files(identity: NodeIdentity, directory: Path) -> tuple[Path, Path]:
    """A self-signed X.509 certificate carrying the node's own Ed25519 key."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.peer_id)])
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(identity.private_key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=365 * 100))
        .sign(identity.private_key, None)
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        identity.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def tls_contexts(identity: NodeIdentity) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for context in (server, client):
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE  # the peer id is checked against the certificate below
    with tempfile.TemporaryDirectory() as directory:
        os.chmod(directory, 0o700)
        cert, key = _certificate_files(identity, Path(directory))
        server.load_cert_chain(cert, key)
    return server, client


def peer_id_in_certificate(der: bytes | None) -> str:
    if not der:
        raise TransportError("the peer presented no certificate")
    key = x509.load_der_x509_certificate(der).public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise TransportError("the peer's certificate key is not Ed25519")
    return peer_id_of(public_key_bytes(key))
