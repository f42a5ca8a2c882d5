"""The node-wide memory budget (DESIGN.md §5 "Resources"), in bytes.

Chunk-sized buffers are the only memory that grows with traffic, so each place
that holds them takes its bytes from one ``MemoryBudget`` (default 64 MiB)
before it makes them: read-ahead and fetches in flight, the decrypted-chunk
cache, pushes in flight, incoming frame bodies and outgoing chunk frames. The
budget is split into pools with fixed shares, not one shared counter, so that
no wait can close a cycle through the network. A reader waiting on ``receive``
waits for two things only: other readers' bodies to finish arriving (each such
reader took its bytes before reading the body and reads on without waiting,
so only its peer's sender, already part-way through that frame, has to go on)
and handlers to finish (local work: verify, store, a database write; never a
send or a request). Neither waits on ``send``, ``push`` or ``fetch``, so the
reader resumes whatever the pushes and replies in ``send`` are waiting for. A
peer that stops part-way through a frame keeps its reservation until
``dead_after`` of silence closes its connection. Where the waits go:

- ``receive``: taken by a connection's reader when a frame header announces a
  large body, *before* the body is read (TCP back-pressure reaches the
  sender); freed when the frame is handled (a request) or handed to the task
  that asked for it (a reply, which its ``fetch`` share already covers).
- ``send``: a chunk read from disk to answer a peer's ``chunk_get``, until the
  reply is written.
- ``push``: a chunk read from disk to push to peers, until they answered.
- ``fetch``: a chunk being loaded, fetched or decrypted for a read or a
  read-ahead, ciphertext and plaintext, until the plaintext is in the cache
  and its cache file written.
- ``cache``: decrypted chunks kept for the reader (``fs.content.ChunkIO``),
  evicted, never waited for.

A pool lets one holder exceed it when it is otherwise empty, so a frame larger
than a small test budget still moves. Each pool counts ``used`` and its
high-water mark ``peak`` (tests assert on them). Trio-only: not thread-safe.
"""

from __future__ import annotations

import ctypes
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from swarmfs import CHUNK_SIZE

MEMORY_BUDGET = 64 * 1024 * 1024
"""Default node-wide budget."""

# Shares of the budget, in sixteenths: 8 + 8 + 8 + 20 + 20 MiB of the default.
_SHARES = {"receive": 2, "send": 2, "push": 2, "fetch": 5, "cache": 5}


class Pool:
    """Bytes of one kind held at once, bounded by ``limit``; waiters are served in order.

    First come, first served: a reader waiting for room for one frame is not
    overtaken again and again by a connection that keeps asking (a flood of
    pushes once kept an honest peer's index reply waiting past its timeout).
    """

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._waiters: deque[tuple[int, trio.Event]] = deque()

    def __repr__(self) -> str:
        return f"<Pool {self.name} {self.used}/{self.limit}>"

    def fits(self, size: int) -> bool:
        return self.used == 0 or self.used + size <= self.limit

    async def acquire(self, size: int) -> None:
        """Wait until ``size`` bytes fit (or the pool is empty) and every earlier waiter
        has been served, then take them."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._waiters and self.fits(size):
            self.take(size)
            return
        granted = trio.Event()
        entry = (size, granted)
        self._waiters.append(entry)
        try:
            await granted.wait()  # release() took the bytes for us
        except BaseException:
            if granted.is_set():  # granted as we were cancelled: hand the bytes back
                self.release(size)
            else:
                self._waiters.remove(entry)
                self._grant()  # we may have been the head that blocked the others
            raise

    def take(self, size: int) -> None:
        """Take bytes without waiting (for memory that is evicted, not waited for)."""
        self.used += size
        if self.used > self.peak:
            self.peak = self.used

    def release(self, size: int) -> None:
        self.used -= size
        assert self.used >= 0, f"{self.name} pool released more than it held"
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.fits(self._waiters[0][0]):
            size, granted = self._waiters.popleft()
            self.take(size)
            granted.set()

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        await self.acquire(size)
        try:
            yield
        finally:
            self.release(size)


class MemoryBudget:
    """The node's pools; see the module docstring."""

    def __init__(self, total: int = MEMORY_BUDGET) -> None:
        self.total = total
        parts = sum(_SHARES.values())
        floor = CHUNK_SIZE  # every pool can hold at least one chunk at a time
        self.receive = Pool("receive", max(floor, total * _SHARES["receive"] // parts))
        self.send = Pool("send", max(floor, total * _SHARES["send"] // parts))
        self.push = Pool("push", max(floor, total * _SHARES["push"] // parts))
        self.fetch = Pool("fetch", max(floor, total * _SHARES["fetch"] // parts))
        self.cache = Pool("cache", max(floor, total * _SHARES["cache"] // parts))

    def pools(self) -> list[Pool]:
        return [self.receive, self.send, self.push, self.fetch, self.cache]


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # from <malloc.h>


def tune_malloc() -> None:
    """Keep chunk buffers in glibc's heaps, and at most two heaps (arenas).

    By default each 1 MiB buffer that was freed left free space at the top of
    the heap past glibc's trim threshold (twice its mmap threshold, ~2 MiB), so
    it went back to the kernel and the next buffer faulted its 256 pages in
    again: sealing a chunk took ~480 page faults and 2.0 ms instead of 1.2.
    A fixed threshold of 4 MiB for mmap and 16 MiB for trimming keeps the
    freed space for the next chunk. Measured: the node's page faults while
    ``dd`` writes 1 GiB of fresh data, 195–216 → 0–4 per MiB; peak RSS of a
    node writing 4 GiB with a peer, 88 → 91–95 MiB.

    Two arenas instead of eight per core: each worker thread's arena kept what
    it once held, so RSS climbed with the threads that ever touched a chunk
    (fetch of 256 MiB: peak RSS 105 → 94 MiB). Pinning the mmap threshold low
    instead (every buffer freshly mapped) saved memory but cost 30 % more CPU.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    for option, value in (
        (_M_ARENA_MAX, 2),
        (_M_MMAP_THRESHOLD, 4 * 1024 * 1024),
        (_M_TRIM_THRESHOLD, 16 * 1024 * 1024),
    ):
        libc.mallopt(option, value)
