"""Chunk I/O for files: seal and store plaintext, load and open stored chunks.

Sealing (two SHA-256 passes and AES-GCM) and disk I/O run in worker threads,
at most one per core. Decrypted chunks are kept in a small LRU bounded in
bytes (the budget's ``cache`` pool), so repeated small reads of one chunk
decrypt it once and read-ahead has somewhere to put what it loaded. A chunk
missing here is asked of a ``ChunkSource`` (the network, plugged in by
``node.py``).

Memory: every load or fetch holds two chunks (ciphertext and plaintext) of the
budget's ``fetch`` pool from before it reads a byte; so read-ahead and fetches
in flight never hold more than that pool, whatever the file size.

A fetched chunk is checked against its id and decrypted in one worker-thread
call (the AEAD tag under the ``h``-bound key binds the plaintext, as on a local
read); the reader gets the plaintext at once, and the cache file is written
behind it, in the node's nursery, while one chunk of ``fetch`` stays held
until the file is written and recorded (so writes behind cannot pile up).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import trio

from swarmfs import CHUNK_SIZE, SMALL_CHUNK
from swarmfs.crypto import chunks as chunk_crypto
from swarmfs.errors import ChunkMissing, CorruptChunk
from swarmfs.memory import MemoryBudget
from swarmfs.meta.records import Block
from swarmfs.store.cas import ChunkStore

log = logging.getLogger(__name__)

PREFETCH_PARALLEL = 8  # chunks loaded ahead at once, node-wide
LOAD_PARALLEL = 8  # chunk files read (and decrypted) at once: mostly waiting on the disk


class ChunkSource(Protocol):
    """Where a chunk that is not stored here comes from (peers)."""

    async def fetch(self, chunk_id: bytes, h: bytes, accept: Callable[[bytes], bytes]) -> bytes:
        """Get the ciphertext from a peer and return ``accept(ciphertext)``, or raise
        ``ChunkMissing``.

        ``accept`` runs in a worker thread after the ciphertext matched ``chunk_id``
        (in the same call); if it raises ``CorruptChunk`` the next peer is asked.
        """
        ...

    async def stored(self, chunk_id: bytes, size: int) -> None:
        """A fetched chunk's cache file is written (the source records it)."""
        ...


class ChunkIO:
    def __init__(
        self,
        store: ChunkStore,
        content_key: bytes,
        cache_bytes: int | None = None,
        source: ChunkSource | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        """``cache_bytes``: the decrypted-chunk cache (default: the budget's ``cache`` pool)."""
        self.store = store
        self._key = content_key
        self._limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))
        self._load_limiter = trio.CapacityLimiter(LOAD_PARALLEL)
        self.budget = budget or MemoryBudget()
        self._plain: OrderedDict[bytes, bytes] = OrderedDict()
        self._cache_pool = self.budget.cache
        self._cache_limit = self._cache_pool.limit if cache_bytes is None else cache_bytes
        self._fetch_pool = self.budget.fetch
        self.source = source
        self._inflight: dict[bytes, trio.Event] = {}
        self._writing_behind: dict[bytes, bytes] = {}
        """Fetched ciphertext whose cache file is being written: a read of a chunk evicted
        from the cache meanwhile opens it from here instead of fetching it again."""
        self._prefetch_slots = trio.Semaphore(PREFETCH_PARALLEL)
        self._read_ahead: set[bytes] = set()
        """Chunks with a read-ahead task, running or waiting for a slot. Each sequential
        read asks for the next chunks again; a second task for one of them would take a
        slot only to wait on the first, and the slots ended up holding such waiters:
        ~2 fetches in flight instead of ``PREFETCH_PARALLEL``."""
        self.nursery: trio.Nursery | None = None  # where read-ahead runs; set by the node

    async def seal_and_store(self, plaintext: bytes) -> tuple[Block, int]:
        """Encrypt and store one chunk; returns its block and ciphertext size."""
        block, size = await trio.to_thread.run_sync(
            self._seal_and_store, plaintext, limiter=self._limiter
        )
        # Not kept in the decrypted-chunk cache: the kernel's page cache holds what was
        # just written, and a writer filling the cache cost 20 MiB of peak memory.
        return block, size

    def _seal_and_store(self, plaintext: bytes) -> tuple[Block, int]:
        sealed = chunk_crypto.seal(self._key, plaintext)
        self.store.put(sealed.chunk_id, sealed.ciphertext)
        return Block(sealed.chunk_id, sealed.h, sealed.length), len(sealed.ciphertext)

    async def read(self, block: Block) -> bytes:
        """The plaintext of a block (``block.length`` bytes; a hole is empty)."""
        if block.chunk_id is None or block.h is None:
            return b""
        cid = block.chunk_id
        while True:
            cached = self._plain.get(cid)
            if cached is not None:
                self._plain.move_to_end(cid)
                return cached
            pending = self._inflight.get(cid)
            if pending is None:
                break
            await pending.wait()  # a read-ahead loads it; look again (it may not be cached)
            if cid not in self._plain and cid not in self._inflight:
                break
        done = self._inflight[cid] = trio.Event()
        try:
            plain = await self._load_or_fetch(block)
        finally:
            if self._inflight.get(cid) is done:
                del self._inflight[cid]
            done.set()
        self._remember(cid, plain)
        return plain

    async def _load_or_fetch(self, block: Block) -> bytes:
        assert block.chunk_id is not None and block.h is not None
        held = 2 * CHUNK_SIZE  # ciphertext and plaintext
        await self._fetch_pool.acquire(held)
        try:
            try:
                if block.length <= SMALL_CHUNK:  # a thread switch costs more than the read
                    return self._load(block)
                return await trio.to_thread.run_sync(self._load, block, limiter=self._load_limiter)
            except (ChunkMissing, CorruptChunk) as exc:
                written = self._writing_behind.get(block.chunk_id)
                if written is not None:  # fetched a moment ago, its cache file not yet written
                    return await trio.to_thread.run_sync(
                        chunk_crypto.unseal,
                        self._key,
                        block.h,
                        written,
                        block.chunk_id,
                        limiter=self._limiter,
                    )
                if self.source is None:
                    raise
                if isinstance(exc, CorruptChunk):
                    log.warning("%s; fetching a good copy from peers", exc)
            key, h, cid = self._key, block.h, block.chunk_id
            box: list[bytes] = []

            def accept(ciphertext: bytes) -> bytes:  # in a worker thread, after the id check
                plain = chunk_crypto.unseal(key, h, ciphertext, cid)
                box.append(ciphertext)
                return plain

            plain = await self.source.fetch(cid, h, accept)
            ciphertext = box.pop()
            if self.nursery is None:
                await self._write_fetched(cid, ciphertext, 0)
            else:  # the plaintext goes to the reader now; one chunk stays held for the file
                self.nursery.start_soon(self._write_fetched, cid, ciphertext, CHUNK_SIZE)
                held -= CHUNK_SIZE  # only once the task owns it (a closed nursery refuses)
            return plain
        finally:
            self._fetch_pool.release(held)

    async def _write_fetched(self, chunk_id: bytes, ciphertext: bytes, held: int) -> None:
        """Write a fetched chunk's cache file and record it; then free ``held`` bytes."""
        self._writing_behind[chunk_id] = ciphertext
        try:
            await trio.to_thread.run_sync(
                self._store_fetched, chunk_id, ciphertext, limiter=self._limiter
            )
            self._writing_behind.pop(chunk_id, None)  # the store has it from now on
            size = len(ciphertext)
            del ciphertext
            assert self.source is not None
            await self.source.stored(chunk_id, size)
        except OSError as exc:  # the read has its data; a later read fetches it again
            log.warning("caching fetched chunk %s failed: %s", chunk_id.hex()[:16], exc)
        except Exception:
            if held == 0:
                raise
            log.exception("caching fetched chunk %s failed", chunk_id.hex()[:16])
        finally:
            self._writing_behind.pop(chunk_id, None)
            if held:
                self._fetch_pool.release(held)

    def prefetch(self, blocks: list[Block]) -> None:
        """Start loading (and, if missing here, fetching) chunks a sequential reader needs next."""
        if self.nursery is None:
            return
        for block in blocks:
            cid = block.chunk_id
            if cid is None or cid in self._plain or cid in self._inflight:
                continue
            if cid in self._read_ahead:  # already queued for a slot by an earlier read
                continue
            self._read_ahead.add(cid)
            self.nursery.start_soon(self._prefetch_one, block, cid)

    async def _prefetch_one(self, block: Block, cid: bytes) -> None:
        try:
            async with self._prefetch_slots:
                await self.read(block)
        except (ChunkMissing, CorruptChunk, OSError) as exc:
            log.debug("read-ahead of a chunk failed: %s", exc)  # the read itself reports it
        except Exception:  # runs in the node's nursery: never take the node down
            log.exception("read-ahead of a chunk failed")
        finally:
            self._read_ahead.discard(cid)

    def _load(self, block: Block) -> bytes:
        assert block.chunk_id is not None and block.h is not None
        ciphertext = self.store.get(block.chunk_id)
        return chunk_crypto.unseal(self._key, block.h, ciphertext, block.chunk_id)

    def _store_fetched(self, chunk_id: bytes, ciphertext: bytes) -> None:
        # Replaces a corrupt local copy in one rename, never by delete and put: a
        # chunk sealed here meanwhile (same content, same id) is never without a file.
        self.store.put(chunk_id, ciphertext, overwrite=True)

    def _remember(self, chunk_id: bytes, plain: bytes) -> None:
        if chunk_id in self._plain or len(plain) > self._cache_limit:
            return
        while self._plain and self._cache_pool.used + len(plain) > self._cache_limit:
            _, old = self._plain.popitem(last=False)
            self._cache_pool.release(len(old))
        self._plain[chunk_id] = plain
        self._cache_pool.take(len(plain))

    def forget(self, chunk_ids: list[bytes]) -> None:
        for c in chunk_ids:
            old = self._plain.pop(c, None)
            if old is not None:
                self._cache_pool.release(len(old))

    async def delete(self, chunk_ids: list[bytes]) -> None:
        """Remove chunks no record references any more (superseded before anyone needed them)."""
        if not chunk_ids:
            return
        self.forget(chunk_ids)
        await trio.to_thread.run_sync(
            lambda: [self.store.delete(c) for c in chunk_ids], limiter=self._limiter
        )

    async def sync(self, chunk_ids: list[bytes]) -> None:
        await trio.to_thread.run_sync(self.store.sync, chunk_ids, limiter=self._limiter)
