"""The deterministic swarm CA, node certificates and the TLS contexts (DESIGN.md §4).

Every member derives the same CA from the swarm key: its Ed25519 key comes from
HKDF, and its subject, serial, validity and extensions are fixed, and Ed25519
signatures are deterministic, so the CA certificate is byte-identical
everywhere and never has to be distributed. Each node signs its own
certificate with it. A peer is trusted only if its certificate chains to that
CA, and its node id is always recomputed from the certificate's public key,
never read from a name in it or from a message.

Pure functions, safe from any thread; building a context touches the disk once
(``ssl`` loads a certificate chain only from a file).
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from swarmfs.crypto.keys import NodeIdentity, ca_private_key, node_id_of
from swarmfs.errors import ProtocolError

_CA_SUBJECT = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "swarmfs swarm CA v1")])
_CA_SERIAL = 1
# Fixed, so the CA is identical on every member; clocks never matter for membership.
_NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


class _HasPeerCert(Protocol):
    """``ssl.SSLObject``, ``ssl.SSLSocket`` or a stream over one (``net.tls.TLSStream``)."""

    def getpeercert(self, binary_form: bool = ...) -> object: ...


def ca_certificate(swarm_key: bytes) -> x509.Certificate:
    """The swarm CA certificate: the same bytes on every member holding ``swarm_key``."""
    key = ca_private_key(swarm_key)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(_CA_SUBJECT)
        .issuer_name(_CA_SUBJECT)
        .public_key(public)
        .serial_number(_CA_SERIAL)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, algorithm=None)
    )


def node_certificate(identity: NodeIdentity, swarm_key: bytes) -> x509.Certificate:
    """This node's certificate, signed by the swarm CA; deterministic as well."""
    ca_key = ca_private_key(swarm_key)
    public = identity.private_key.public_key()
    node_id = node_id_of(public)
    return (
        x509.CertificateBuilder()
        # The CN is for people reading the certificate; nothing trusts it.
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(_CA_SUBJECT)
        .public_key(public)
        .serial_number((int.from_bytes(_raw(public)[:16], "big") >> 1) | 1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, algorithm=None)
    )


def node_id_from_der(der: bytes) -> str:
    """The node id of a DER certificate's Ed25519 key; ``ProtocolError`` for anything else."""
    try:
        public = x509.load_der_x509_certificate(der).public_key()
    except ValueError as exc:
        raise ProtocolError(f"unreadable peer certificate: {exc}") from None
    if not isinstance(public, Ed25519PublicKey):
        raise ProtocolError("peer certificate does not hold an Ed25519 key")
    return node_id_of(public)


def peer_node_id(ssl_object: _HasPeerCert) -> str:
    """The authenticated peer's node id, from the certificate it proved it holds."""
    der = ssl_object.getpeercert(binary_form=True)
    if not isinstance(der, bytes):
        raise ProtocolError("peer presented no certificate")
    return node_id_from_der(der)


def server_context(identity: NodeIdentity, swarm_key: bytes, scratch_dir: Path) -> ssl.SSLContext:
    """Accepting side: TLS 1.3 only, a client certificate from this swarm required."""
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, identity, swarm_key, scratch_dir)
    ctx.num_tickets = 0  # no resumption: every connection proves its certificate again
    return ctx


def client_context(identity: NodeIdentity, swarm_key: bytes, scratch_dir: Path) -> ssl.SSLContext:
    """Dialling side: TLS 1.3 only, the server must hold a certificate from this swarm.

    There is no hostname check: peers are named by node id (from the
    certificate), not by DNS, and addresses come from untrusted hellos.
    """
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, identity, swarm_key, scratch_dir)
    ctx.check_hostname = False
    return ctx


def _context(
    protocol: ssl._SSLMethod, identity: NodeIdentity, swarm_key: bytes, scratch_dir: Path
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    # The swarm CA is the only trust anchor: no system store, no partial chains.
    ctx.load_verify_locations(cadata=_pem(ca_certificate(swarm_key)))
    _load_identity(ctx, identity, swarm_key, scratch_dir)
    return ctx


def _load_identity(
    ctx: ssl.SSLContext, identity: NodeIdentity, swarm_key: bytes, scratch_dir: Path
) -> None:
    """Hand key and certificate to OpenSSL, which reads them only from a file.

    The file is created 0600 by ``mkstemp`` inside the caller's private data
    dir and removed as soon as OpenSSL has read it.
    """
    key_pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd, name = tempfile.mkstemp(prefix=".tls-", suffix=".pem", dir=scratch_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem + _pem(node_certificate(identity, swarm_key)).encode())
        ctx.load_cert_chain(name)
    finally:
        os.unlink(name)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()
