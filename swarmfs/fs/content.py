"""Chunk I/O for files: seal and store plaintext, load and open stored chunks.

Sealing (two SHA-256 passes and AES-GCM) and disk I/O run in worker threads,
at most one per core. Decrypted chunks are kept in a small LRU bounded in
bytes, so repeated small reads of one chunk decrypt it once. A chunk missing
here is asked of a ``ChunkSource`` (the network, plugged in by ``node.py``).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Protocol

import trio

from swarmfs.crypto import chunks as chunk_crypto
from swarmfs.errors import ChunkMissing, CorruptChunk
from swarmfs.meta.records import Block
from swarmfs.store.cas import ChunkStore

log = logging.getLogger(__name__)

PREFETCH_PARALLEL = 8  # chunks loaded ahead at once, node-wide


class ChunkSource(Protocol):
    """Where a chunk that is not stored here comes from (peers)."""

    async def fetch(self, chunk_id: bytes, h: bytes) -> bytes:
        """Return ciphertext already matched to ``chunk_id``, or raise ``ChunkMissing``."""
        ...


class ChunkIO:
    def __init__(
        self,
        store: ChunkStore,
        content_key: bytes,
        cache_bytes: int = 32 * 1024 * 1024,
        source: ChunkSource | None = None,
    ) -> None:
        self.store = store
        self._key = content_key
        self._limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))
        self._plain: OrderedDict[bytes, bytes] = OrderedDict()
        self._plain_bytes = 0
        self._cache_limit = cache_bytes
        self.source = source
        self._inflight: dict[bytes, trio.Event] = {}
        self._prefetch_slots = trio.Semaphore(PREFETCH_PARALLEL)
        self.nursery: trio.Nursery | None = None  # where read-ahead runs; set by the node

    async def seal_and_store(self, plaintext: bytes) -> tuple[Block, int]:
        """Encrypt and store one chunk; returns its block and ciphertext size."""
        return await trio.to_thread.run_sync(self._seal_and_store, plaintext, limiter=self._limiter)

    def _seal_and_store(self, plaintext: bytes) -> tuple[Block, int]:
        sealed = chunk_crypto.seal(self._key, plaintext)
        self.store.put(sealed.chunk_id, sealed.ciphertext)
        self._remember(sealed.chunk_id, plaintext)
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
        try:
            return await trio.to_thread.run_sync(self._load, block, limiter=self._limiter)
        except (ChunkMissing, CorruptChunk) as exc:
            if self.source is None:
                raise
            if isinstance(exc, CorruptChunk):
                log.warning("%s; fetching a good copy from peers", exc)
            ciphertext = await self.source.fetch(block.chunk_id, block.h)
            return await trio.to_thread.run_sync(
                self._store_fetched, block, ciphertext, limiter=self._limiter
            )

    def prefetch(self, blocks: list[Block]) -> None:
        """Start loading (and, if missing here, fetching) chunks a sequential reader needs next."""
        if self.nursery is None:
            return
        for block in blocks:
            cid = block.chunk_id
            if cid is None or cid in self._plain or cid in self._inflight:
                continue
            self.nursery.start_soon(self._prefetch_one, block)

    async def _prefetch_one(self, block: Block) -> None:
        async with self._prefetch_slots:
            try:
                await self.read(block)
            except (ChunkMissing, CorruptChunk, OSError) as exc:
                log.debug("read-ahead of a chunk failed: %s", exc)  # the read itself reports it
            except Exception:  # runs in the node's nursery: never take the node down
                log.exception("read-ahead of a chunk failed")

    def _load(self, block: Block) -> bytes:
        assert block.chunk_id is not None and block.h is not None
        ciphertext = self.store.get(block.chunk_id)
        return chunk_crypto.unseal(self._key, block.h, ciphertext, block.chunk_id)

    def _store_fetched(self, block: Block, ciphertext: bytes) -> bytes:
        assert block.chunk_id is not None and block.h is not None
        plain = chunk_crypto.verify(self._key, block.chunk_id, block.h, ciphertext, id_checked=True)
        self.store.delete(block.chunk_id)  # a corrupt local copy is replaced
        self.store.put(block.chunk_id, ciphertext)
        return plain

    def _remember(self, chunk_id: bytes, plain: bytes) -> None:
        if chunk_id in self._plain or len(plain) > self._cache_limit:
            return
        self._plain[chunk_id] = plain
        self._plain_bytes += len(plain)
        while self._plain_bytes > self._cache_limit:
            _, old = self._plain.popitem(last=False)
            self._plain_bytes -= len(old)

    def forget(self, chunk_ids: list[bytes]) -> None:
        for c in chunk_ids:
            old = self._plain.pop(c, None)
            if old is not None:
                self._plain_bytes -= len(old)

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
