"""The chunk envelope (DESIGN.md §3) and the chunk store, without a mount.

Tamper tests flip bits and expect ``CorruptChunk``, never wrong plaintext
(STYLE.md habit 12).
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from faultkit import small_disk
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmfs.crypto import chunks
from swarmfs.errors import ChunkMissing, CorruptChunk
from swarmfs.fs.content import ChunkIO
from swarmfs.meta.records import Block
from swarmfs.store.cas import ChunkStore

KEY = bytes(range(32))


@given(st.binary(max_size=5000))
def test_seal_unseal_round_trip(plaintext: bytes) -> None:
    sealed = chunks.seal(KEY, plaintext)
    assert sealed.length == len(plaintext)
    assert sealed.h == hashlib.sha256(plaintext).digest()
    assert sealed.chunk_id == hashlib.sha256(sealed.ciphertext).digest()
    assert sealed.ciphertext[:1] == b"\x01"
    # format byte + GCM tag: the ciphertext is exactly 17 bytes longer
    assert len(sealed.ciphertext) == len(plaintext) + 17
    assert chunks.unseal(KEY, sealed.h, sealed.ciphertext, sealed.chunk_id) == plaintext
    assert chunks.verify(KEY, sealed.chunk_id, sealed.h, sealed.ciphertext) == plaintext


def test_a_full_size_chunk_round_trips() -> None:
    plaintext = os.urandom(1024 * 1024)
    sealed = chunks.seal(KEY, plaintext)
    assert plaintext not in sealed.ciphertext
    assert chunks.unseal(KEY, sealed.h, sealed.ciphertext) == plaintext


def test_equal_plaintext_gives_equal_chunk_id_dedup() -> None:
    data = b"the same bytes in two files" * 100
    a, b = chunks.seal(KEY, data), chunks.seal(KEY, bytes(data))
    assert a.chunk_id == b.chunk_id
    assert a.ciphertext == b.ciphertext
    assert chunks.seal(KEY, data + b"!").chunk_id != a.chunk_id


def test_different_swarm_keys_give_different_chunks() -> None:
    data = b"x" * 100
    other = chunks.seal(secrets.token_bytes(32), data)
    mine = chunks.seal(KEY, data)
    assert other.chunk_id != mine.chunk_id
    assert other.h == mine.h
    with pytest.raises(CorruptChunk):
        chunks.unseal(KEY, other.h, other.ciphertext, other.chunk_id)


def test_id_check_needs_no_key() -> None:
    sealed = chunks.seal(KEY, b"payload")
    assert chunks.id_matches(sealed.chunk_id, sealed.ciphertext)
    assert not chunks.id_matches(sealed.chunk_id, sealed.ciphertext + b"\x00")
    assert not chunks.id_matches(bytes(32), sealed.ciphertext)
    tampered = bytearray(sealed.ciphertext)
    tampered[5] ^= 0x01
    assert not chunks.id_matches(sealed.chunk_id, bytes(tampered))


@settings(max_examples=60)
@given(st.binary(min_size=1, max_size=600), st.data())
def test_any_flipped_bit_raises_corrupt_chunk_never_wrong_data(
    plaintext: bytes, data: st.DataObject
) -> None:
    sealed = chunks.seal(KEY, plaintext)
    bit = data.draw(st.integers(0, len(sealed.ciphertext) * 8 - 1), label="bit")
    tampered = bytearray(sealed.ciphertext)
    tampered[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CorruptChunk):
        chunks.unseal(KEY, sealed.h, bytes(tampered), sealed.chunk_id)
    with pytest.raises(CorruptChunk):
        chunks.verify(KEY, sealed.chunk_id, sealed.h, bytes(tampered))


def test_truncated_or_swapped_chunks_are_rejected() -> None:
    a = chunks.seal(KEY, b"A" * 1000)
    b = chunks.seal(KEY, b"B" * 1000)
    with pytest.raises(CorruptChunk):
        chunks.unseal(KEY, a.h, a.ciphertext[:-1])
    with pytest.raises(CorruptChunk):
        chunks.unseal(KEY, a.h, b"")
    # b's ciphertext stored under a's id: the key is bound to a's h, so the tag fails
    with pytest.raises(CorruptChunk):
        chunks.unseal(KEY, a.h, b.ciphertext, a.chunk_id)
    with pytest.raises(CorruptChunk):
        chunks.verify(KEY, a.chunk_id, a.h, b.ciphertext)
    # the right ciphertext with a wrong h is caught too
    with pytest.raises(CorruptChunk):
        chunks.verify(KEY, a.chunk_id, b.h, a.ciphertext)


def test_unknown_format_byte_is_corrupt() -> None:
    sealed = chunks.seal(KEY, b"data")
    with pytest.raises(CorruptChunk, match="format"):
        chunks.unseal(KEY, sealed.h, b"\x02" + sealed.ciphertext[1:])


# --- the store -------------------------------------------------------------------


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_store_layout_put_get_and_dedup(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "chunks")
    sealed = chunks.seal(KEY, b"hello world")
    assert store.put(sealed.chunk_id, sealed.ciphertext) is True
    assert store.put(sealed.chunk_id, sealed.ciphertext) is False  # already there
    hexid = sealed.chunk_id.hex()
    expected = tmp_path / "chunks" / hexid[:2] / hexid[2:4] / hexid
    assert _files(tmp_path / "chunks") == [expected]
    assert store.has(sealed.chunk_id)
    assert store.get(sealed.chunk_id) == sealed.ciphertext
    assert store.size(sealed.chunk_id) == len(sealed.ciphertext)
    assert list(store.ids()) == [sealed.chunk_id]
    assert store.delete(sealed.chunk_id) is True
    assert store.delete(sealed.chunk_id) is False
    with pytest.raises(ChunkMissing):
        store.get(sealed.chunk_id)


def test_a_corrupted_chunk_file_is_detected_on_read(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "chunks")
    sealed = chunks.seal(KEY, os.urandom(4096))
    store.put(sealed.chunk_id, sealed.ciphertext)
    path = store.path(sealed.chunk_id)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    stored = store.get(sealed.chunk_id)
    assert not chunks.id_matches(sealed.chunk_id, stored)
    with pytest.raises(CorruptChunk):
        chunks.unseal(KEY, sealed.h, stored, sealed.chunk_id)


def test_partial_chunks_never_appear_under_their_id(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "chunks")
    leftover = tmp_path / "chunks" / "tmp" / "0123456789abcdef.000000"
    leftover.write_bytes(b"half a chunk")
    assert list(store.ids()) == []  # tmp/ is not a chunk directory
    assert store.clean_tmp() == 1
    assert not leftover.exists()


def test_overwrite_renames_a_new_file_over_the_old_one(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "chunks")
    sealed = chunks.seal(KEY, os.urandom(4096))
    path = store.path(sealed.chunk_id)
    assert store.put(sealed.chunk_id, b"\x01corrupt") is True
    old_inode = path.stat().st_ino
    assert store.put(sealed.chunk_id, sealed.ciphertext) is False  # a plain put keeps it
    assert path.read_bytes() == b"\x01corrupt"
    assert store.put(sealed.chunk_id, sealed.ciphertext, overwrite=True) is True
    assert store.get(sealed.chunk_id) == sealed.ciphertext
    assert path.stat().st_ino != old_inode  # renamed over it, not rewritten in place
    assert _files(tmp_path / "chunks") == [path]  # no temporary file left


def test_an_overwrite_that_fails_for_want_of_space_leaves_the_old_file(tmp_path: Path) -> None:
    with small_disk(tmp_path / "chunks", "64k") as root:
        store = ChunkStore(root)
        sealed = chunks.seal(KEY, os.urandom(256 * 1024))  # larger than the whole disk
        store.put(sealed.chunk_id, b"\x01old copy")
        with pytest.raises(OSError) as failure:
            store.put(sealed.chunk_id, sealed.ciphertext, overwrite=True)
        assert failure.value.errno == errno.ENOSPC
        assert store.get(sealed.chunk_id) == b"\x01old copy"
        assert _files(root) == [store.path(sealed.chunk_id)]


class _SealMeanwhile:
    """A ``ChunkSource`` during whose fetch something happens here first."""

    def __init__(self, ciphertext: bytes, meanwhile: Callable[[], Awaitable[None]]) -> None:
        self.ciphertext = ciphertext
        self.meanwhile = meanwhile
        self.recorded: list[bytes] = []

    async def fetch(self, chunk_id: bytes, h: bytes, accept: Callable[[bytes], bytes]) -> bytes:
        await self.meanwhile()
        return await trio.to_thread.run_sync(accept, self.ciphertext)

    async def stored(self, chunk_id: bytes, size: int) -> None:
        self.recorded.append(chunk_id)


async def test_a_fetched_copy_that_cannot_be_written_leaves_the_chunk_sealed_meanwhile(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A read misses a chunk here and fetches it; meanwhile a writer seals the same
    content (the same id) here. Writing the fetched copy then fails (here its temporary
    directory is gone; on a node, a full disk or an I/O error): the sealed file stays."""
    plain = os.urandom(64 * 1024)
    sealed = chunks.seal(KEY, plain)
    store = ChunkStore(tmp_path / "chunks")
    io = ChunkIO(store, KEY)

    async def seal_then_break_writes() -> None:
        await io.seal_and_store(plain)
        (tmp_path / "chunks" / "tmp").rmdir()

    io.source = source = _SealMeanwhile(sealed.ciphertext, seal_then_break_writes)
    with trio.fail_after(5):
        assert await io.read(Block(sealed.chunk_id, sealed.h, sealed.length)) == plain
    assert "caching fetched chunk" in caplog.text  # the write failed, and said so
    assert source.recorded == []
    assert store.get(sealed.chunk_id) == sealed.ciphertext
