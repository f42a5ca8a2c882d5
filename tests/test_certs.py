"""The deterministic swarm CA, node certificates and mutual TLS 1.3 (in memory)."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from swarmfs.crypto import certs
from swarmfs.crypto.keys import NodeIdentity, ca_private_key, new_swarm_key
from swarmfs.errors import ProtocolError


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_every_member_derives_the_byte_identical_ca() -> None:
    key = new_swarm_key()
    assert _der(certs.ca_certificate(key)) == _der(certs.ca_certificate(bytes(key)))
    assert _der(certs.ca_certificate(key)) != _der(certs.ca_certificate(new_swarm_key()))


def test_node_certificate_is_signed_by_the_swarm_ca() -> None:
    key, node = new_swarm_key(), NodeIdentity.generate()
    cert = certs.node_certificate(node, key)
    cert.verify_directly_issued_by(certs.ca_certificate(key))
    with pytest.raises(InvalidSignature):
        cert.verify_directly_issued_by(certs.ca_certificate(new_swarm_key()))
    assert certs.node_id_from_der(_der(cert)) == node.node_id


def test_node_id_comes_from_the_key_not_the_name() -> None:
    key, honest, liar = new_swarm_key(), NodeIdentity.generate(), NodeIdentity.generate()
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, honest.node_id)]))
        .issuer_name(certs.ca_certificate(key).subject)
        .public_key(liar.private_key.public_key())
        .serial_number(7)
        .not_valid_before(datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC))
        .sign(ca_private_key(key), algorithm=None)
    )
    assert certs.node_id_from_der(_der(forged)) == liar.node_id


def test_non_ed25519_or_garbage_certificates_are_protocol_errors() -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    ec_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ec_key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC))
        .sign(ec_key, algorithm=hashes.SHA256())
    )
    with pytest.raises(ProtocolError, match="Ed25519"):
        certs.node_id_from_der(_der(ec_cert))
    with pytest.raises(ProtocolError, match="unreadable"):
        certs.node_id_from_der(b"\x30\x03garbage")


def test_contexts_are_tls13_only_mutual_and_leave_no_key_file(tmp_path: Path) -> None:
    key, node = new_swarm_key(), NodeIdentity.generate()
    server = certs.server_context(node, key, tmp_path)
    client = certs.client_context(node, key, tmp_path)
    for ctx in (server, client):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert len(ctx.get_ca_certs()) == 1
    assert not client.check_hostname
    assert list(tmp_path.iterdir()) == []


async def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[trio.SSLStream[trio.abc.Stream], trio.SSLStream[trio.abc.Stream]]:
    left, right = trio.testing.memory_stream_pair()
    server = trio.SSLStream(left, server_ctx, server_side=True)
    client = trio.SSLStream(right, client_ctx, server_hostname=None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    return server, client


async def test_members_authenticate_each_other_by_node_id(tmp_path: Path) -> None:
    key, a, b = new_swarm_key(), NodeIdentity.generate(), NodeIdentity.generate()
    with trio.fail_after(5):
        server, client = await _handshake(
            certs.server_context(a, key, tmp_path), certs.client_context(b, key, tmp_path)
        )
        assert certs.peer_node_id(server) == b.node_id
        assert certs.peer_node_id(client) == a.node_id
        assert server.version() == "TLSv1.3"


@pytest.mark.parametrize("wrong_side", ["client", "server"])
async def test_a_node_with_another_swarm_key_fails_the_handshake(
    tmp_path: Path, wrong_side: str
) -> None:
    good, bad = new_swarm_key(), new_swarm_key()
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    server_key, client_key = (good, bad) if wrong_side == "client" else (bad, good)
    with trio.fail_after(5), pytest.RaisesGroup(trio.BrokenResourceError, allow_unwrapped=True):
        _, client = await _handshake(
            certs.server_context(a, server_key, tmp_path),
            certs.client_context(b, client_key, tmp_path),
        )
        # TLS 1.3: a client learns that its certificate was refused on first read.
        await client.send_all(b"x")
        await client.receive_some()
