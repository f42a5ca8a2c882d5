"""Swarm key, derived keys and the node's Ed25519 identity.

The swarm key is 32 random bytes shared by every member; the node key is this
machine's own. Both live in the data dir with mode 0600. A node id is the first
16 bytes of SHA-256 of the node's public key in lower-case base32 (26
characters), always computed from a key, never read from a message.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from swarmfs.errors import UserError

SWARM_KEY_BYTES = 32
_LABEL_PREFIX = b"swarmfs/v1/"


def new_swarm_key() -> bytes:
    return secrets.token_bytes(SWARM_KEY_BYTES)


def derive_key(swarm_key: bytes, label: str) -> bytes:
    """A 32-byte key for one purpose (``ca``, ``content``), domain-separated by label."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=_LABEL_PREFIX + label.encode()
    ).derive(swarm_key)


def write_secret(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 atomically (temp + rename), never world-readable."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def encode_swarm_key(key: bytes) -> bytes:
    """The key file's text form: one line of base64url, so it can be pasted."""
    return base64.urlsafe_b64encode(key).rstrip(b"=") + b"\n"


def decode_swarm_key(text: bytes, source: str) -> bytes:
    try:
        raw = text.strip()
        key = base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    except ValueError as exc:
        raise UserError(f"{source}: not a swarm key ({exc})") from None
    if len(key) != SWARM_KEY_BYTES:
        raise UserError(f"{source}: not a swarm key (expected {SWARM_KEY_BYTES} bytes)")
    return key


def read_swarm_key(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read swarm key {path}: {exc.strerror}") from None
    return decode_swarm_key(data, str(path))


def node_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    digest = hashlib.sha256(raw).digest()[:16]
    return base64.b32encode(digest).decode().rstrip("=").lower()


@dataclass(frozen=True)
class NodeIdentity:
    private_key: Ed25519PrivateKey

    @property
    def node_id(self) -> str:
        return node_id_of(self.private_key.public_key())

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(Ed25519PrivateKey.generate())

    def save(self, path: Path) -> None:
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_secret(path, pem)

    @classmethod
    def load(cls, path: Path) -> NodeIdentity:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except OSError as exc:
            raise UserError(f"cannot read node key {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise UserError(f"{path}: not a node key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise UserError(f"{path}: not an Ed25519 node key")
        return cls(key)


def ca_private_key(swarm_key: bytes) -> Ed25519PrivateKey:
    """The swarm CA's key: the same on every member, so every member derives one CA."""
    return Ed25519PrivateKey.from_private_bytes(derive_key(swarm_key, "ca"))
