"""Chunk envelope (DESIGN.md §3): convergent AES-256-GCM, content-addressed.

For plaintext P: ``h = SHA-256(P)``, key ``k = HMAC-SHA256(content_key, h)``,
``C = 0x01 ‖ AES-256-GCM(k, nonce=0, P, aad=0x01)``, chunk id ``SHA-256(C)``.
The key is unique per plaintext, so the fixed nonce only repeats with identical
plaintext, and equal plaintext gives equal ciphertext (dedup). Anyone can check
a chunk against its id; only members can decrypt. Pure and thread-safe: callers
run these in worker threads (hashlib and AES-GCM release the GIL on large buffers).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from swarmfs.errors import CorruptChunk

FORMAT_V1 = b"\x01"
_NONCE = bytes(12)


@dataclass(frozen=True)
class SealedChunk:
    chunk_id: bytes
    h: bytes
    ciphertext: bytes
    length: int


def chunk_key(content_key: bytes, h: bytes) -> bytes:
    return hmac.new(content_key, h, hashlib.sha256).digest()


def seal(content_key: bytes, plaintext: bytes) -> SealedChunk:
    h = hashlib.sha256(plaintext).digest()
    ciphertext = FORMAT_V1 + AESGCM(chunk_key(content_key, h)).encrypt(_NONCE, plaintext, FORMAT_V1)
    return SealedChunk(hashlib.sha256(ciphertext).digest(), h, ciphertext, len(plaintext))


def id_matches(chunk_id: bytes, ciphertext: bytes) -> bool:
    """The check any node can make, key or not, before storing a chunk from a peer."""
    return hmac.compare_digest(hashlib.sha256(ciphertext).digest(), chunk_id)


def unseal(content_key: bytes, h: bytes, ciphertext: bytes, chunk_id: bytes = b"") -> bytes:
    """Decrypt a chunk; the AEAD tag under the h-bound key catches corruption and swaps.

    The id is not rehashed on the hot read path (the tag already binds the content);
    ``verify`` does the full check for fsck.
    """
    if ciphertext[:1] != FORMAT_V1:
        raise CorruptChunk(f"chunk {chunk_id.hex()[:16]}: unknown format byte")
    try:
        return AESGCM(chunk_key(content_key, h)).decrypt(_NONCE, ciphertext[1:], FORMAT_V1)
    except InvalidTag:
        raise CorruptChunk(f"chunk {chunk_id.hex()[:16]}: authentication failed") from None


def verify(
    content_key: bytes, chunk_id: bytes, h: bytes, ciphertext: bytes, id_checked: bool = False
) -> bytes:
    """Full check (id, tag and plaintext hash); returns the plaintext.

    ``id_checked``: the caller already matched the content to its id (a fetch does,
    to skip a peer serving bad data), so it is not hashed a second time.
    """
    if not id_checked and not id_matches(chunk_id, ciphertext):
        raise CorruptChunk(f"chunk {chunk_id.hex()[:16]}: content does not match its id")
    plaintext = unseal(content_key, h, ciphertext, chunk_id)
    if hashlib.sha256(plaintext).digest() != h:
        raise CorruptChunk(f"chunk {chunk_id.hex()[:16]}: plaintext hash mismatch")
    return plaintext
