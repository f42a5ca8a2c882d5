"""Uncommitted writes of one inode (DESIGN.md §3 "Open files and commits").

A write lands in a *dirty chunk*: the byte ranges written so far in one 1 MiB
chunk. One dirty chunk at a time lives in memory (the one a sequential writer
is filling); the others are spilled to a sparse staging file encrypted with the
per-process ``StagingCipher``, so staging never holds plaintext on disk. A
chunk whose ranges cover all of it is complete: the caller seals and stores it
at once and it becomes *pending* (stored, not yet committed). Reading back
overlays the ranges on the base content (pending chunk or committed block).

Not thread-safe; the owner serialises access with a per-inode lock. File I/O
and encryption run in worker threads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import trio

from swarmfs import CHUNK_SIZE
from swarmfs.crypto.staging import STAGING_BLOCK, StagingCipher
from swarmfs.meta.records import Block

Interval = tuple[int, int]


def add_interval(intervals: list[Interval], a: int, b: int) -> list[Interval]:
    """Union of sorted disjoint intervals with [a, b), merged."""
    out: list[Interval] = []
    for x, y in intervals:
        if y < a or x > b:
            out.append((x, y))
        else:
            a, b = min(a, x), max(b, y)
    out.append((a, b))
    out.sort()
    return out


def clip_intervals(intervals: list[Interval], end: int) -> list[Interval]:
    return [(x, min(y, end)) for x, y in intervals if x < end]


@dataclass
class DirtyChunk:
    intervals: list[Interval] = field(default_factory=list)
    buf: bytearray | None = None  # in memory (CHUNK_SIZE long); None: data is in the file

    @property
    def complete(self) -> bool:
        return self.intervals == [(0, CHUNK_SIZE)]


class Staging:
    def __init__(self, path: Path, cipher: StagingCipher, size: int) -> None:
        self.path = path
        self._cipher = cipher
        self._fd: int | None = None
        self.size = size
        self.trunc_floor = size  # committed content at or after this offset is gone
        self.pending: dict[int, Block] = {}
        self.sealing: dict[int, bytes] = {}  # full chunks written, not stored yet
        self.inflight: set[int] = set()  # of those, the ones a background task is sealing
        self.seal_error: OSError | None = None  # reported to the writer's next write
        self._sealed = trio.Event()
        self.new_chunks: list[tuple[bytes, int]] = []  # (id, ciphertext size) stored, uncommitted
        self.dirty: dict[int, DirtyChunk] = {}
        self.modified = False  # anything to commit
        self.mtime_ns = 0

    # -- writes ---------------------------------------------------------------
    async def write(self, index: int, offset: int, data: bytes) -> bool:
        """Stage ``data`` at ``offset`` in chunk ``index``; True if the chunk is now complete."""
        chunk = self.dirty.get(index)
        if chunk is None:
            chunk = self.dirty[index] = DirtyChunk()
            await self._give_buffer(index, chunk)
        if chunk.buf is not None:
            chunk.buf[offset : offset + len(data)] = data
        else:
            await trio.to_thread.run_sync(self._file_write, index, offset, data, chunk.intervals)
        chunk.intervals = add_interval(chunk.intervals, offset, offset + len(data))
        self.modified = True
        return chunk.complete

    async def _give_buffer(self, index: int, chunk: DirtyChunk) -> None:
        """Move the in-memory buffer to the newest dirty chunk, spilling the previous holder."""
        for other_index, other in self.dirty.items():
            if other is not chunk and other.buf is not None:
                buf = other.buf
                spilled: list[Interval] = []  # ranges may share a 4 KiB staging block
                for a, b in other.intervals:
                    await trio.to_thread.run_sync(
                        self._file_write, other_index, a, bytes(buf[a:b]), spilled
                    )
                    spilled = add_interval(spilled, a, b)
                other.buf = None
                chunk.buf = buf
                return
        chunk.buf = bytearray(CHUNK_SIZE)

    async def complete_data(self, index: int) -> bytes:
        """The full content of a complete dirty chunk (for sealing), wherever it is staged."""
        chunk = self.dirty[index]
        assert chunk.complete
        if chunk.buf is not None:
            return bytes(chunk.buf)
        return await trio.to_thread.run_sync(self._file_read, index, 0, CHUNK_SIZE)

    def seal_finished(
        self,
        index: int,
        data: bytes,
        result: tuple[Block, int] | None,
        error: OSError | None = None,
    ) -> None:
        """A background seal ended; with no ``result`` it failed, and is retried at commit."""
        self.inflight.discard(index)
        if error is not None:
            self.seal_error = error
        if result is not None:
            block, csize = result
            assert block.chunk_id is not None
            self.new_chunks.append((block.chunk_id, csize))  # unreferenced ones: GC reclaims
            if self.sealing.get(index) is data:  # not superseded meanwhile
                del self.sealing[index]
                self.pending[index] = block
        event, self._sealed = self._sealed, trio.Event()
        event.set()

    async def wait_inflight(self) -> None:
        while self.inflight:
            await self._sealed.wait()

    def truncate(self, size: int) -> None:
        """Cut everything at or past ``size`` (the caller converts a cut pending chunk first)."""
        cut_index = size // CHUNK_SIZE
        for i in [i for i in self.dirty if i * CHUNK_SIZE >= size]:
            del self.dirty[i]
        for i in [i for i in self.pending if i * CHUNK_SIZE >= size]:
            del self.pending[i]
        for i in [i for i in self.sealing if i * CHUNK_SIZE >= size]:
            del self.sealing[i]
        if cut_index in self.dirty:
            chunk = self.dirty[cut_index]
            chunk.intervals = clip_intervals(chunk.intervals, size - cut_index * CHUNK_SIZE)
        self.trunc_floor = min(self.trunc_floor, size)
        self.size = size
        self.modified = True

    # -- reads ----------------------------------------------------------------
    async def overlay(self, index: int, base: bytes, length: int) -> bytes:
        """Chunk ``index`` as staged: ``base`` zero-extended to ``length``, ranges on top."""
        out = bytearray(base[:length])
        out.extend(bytes(length - len(out)))
        chunk = self.dirty.get(index)
        if chunk is None:
            return bytes(out)
        for a, b in chunk.intervals:
            b = min(b, length)
            if a >= b:
                continue
            if chunk.buf is not None:
                out[a:b] = chunk.buf[a:b]
            else:
                out[a:b] = await trio.to_thread.run_sync(self._file_read, index, a, b - a)
        return bytes(out)

    def reset(self, size: int) -> None:
        """After a commit: nothing is staged and the committed version is the base."""
        self.size = self.trunc_floor = size
        self.pending.clear()
        self.sealing.clear()
        self.new_chunks.clear()
        self.dirty.clear()
        self.modified = False
        self.seal_error = None  # the commit retried that seal and succeeded
        if self._fd is not None:
            os.ftruncate(self._fd, 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)

    # -- the encrypted staging file (worker threads) -----------------------------
    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        return self._fd

    def _file_write(self, index: int, offset: int, data: bytes, existing: list[Interval]) -> None:
        fd = self._open()
        start = index * CHUNK_SIZE + offset
        end = start + len(data)
        a = start - start % STAGING_BLOCK
        b = end + (-end % STAGING_BLOCK)
        span = bytearray(b - a)
        chunk_base = index * CHUNK_SIZE
        # keep earlier staged bytes sharing the edge blocks
        for edge in {a, b - STAGING_BLOCK}:
            lo, hi = edge - chunk_base, edge - chunk_base + STAGING_BLOCK
            if any(x < hi and y > lo for x, y in existing):
                old = self._read_blocks(fd, edge, STAGING_BLOCK)
                span[edge - a : edge - a + STAGING_BLOCK] = old
        span[start - a : end - a] = data
        os.pwrite(fd, self._cipher.encrypt(a // STAGING_BLOCK, bytes(span)), a)

    def _read_blocks(self, fd: int, offset: int, length: int) -> bytes:
        raw = os.pread(fd, length, offset)
        raw += bytes(length - len(raw))
        return self._cipher.decrypt(offset // STAGING_BLOCK, raw)

    def _file_read(self, index: int, offset: int, length: int) -> bytes:
        fd = self._open()
        start = index * CHUNK_SIZE + offset
        a = start - start % STAGING_BLOCK
        end = start + length
        b = end + (-end % STAGING_BLOCK)
        plain = self._read_blocks(fd, a, b - a)
        return plain[start - a : start - a + length]
