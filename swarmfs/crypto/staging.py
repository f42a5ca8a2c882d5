"""Cipher for staged (not yet committed) file data: AES-256-XTS per 4 KiB block.

The key is random per process and never written anywhere, so staging files are
unreadable after a restart (they were never promised durable). XTS is the disk
mode: rewriting a block in place leaks nothing but that it changed.
"""

from __future__ import annotations

import secrets

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

STAGING_BLOCK = 4096


class StagingCipher:
    def __init__(self) -> None:
        self._key = secrets.token_bytes(64)

    def _cipher(self, block_no: int) -> Cipher:
        return Cipher(algorithms.AES(self._key), modes.XTS(block_no.to_bytes(16, "little")))

    def encrypt(self, first_block: int, data: bytes) -> bytes:
        """Encrypt whole 4 KiB blocks starting at block number ``first_block``."""
        out = bytearray(len(data))
        for i in range(0, len(data), STAGING_BLOCK):
            enc = self._cipher(first_block + i // STAGING_BLOCK).encryptor()
            out[i : i + STAGING_BLOCK] = enc.update(data[i : i + STAGING_BLOCK])
        return bytes(out)

    def decrypt(self, first_block: int, data: bytes) -> bytes:
        out = bytearray(len(data))
        for i in range(0, len(data), STAGING_BLOCK):
            dec = self._cipher(first_block + i // STAGING_BLOCK).decryptor()
            out[i : i + STAGING_BLOCK] = dec.update(data[i : i + STAGING_BLOCK])
        return bytes(out)
