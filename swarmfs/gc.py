"""Garbage collection and cache eviction, run periodically by the node.

Deletes chunks that nothing references any more (after a grace period, so a
chunk pushed before its record arrives, or a fresh fetch, is kept), chunks of
trash entries past the retention period, and least-recently-used cached
chunks while the cache is over ``--cache-size``. Pinned chunks (written here
or held as a replica) are never evicted. A chunk evicted while still
referenced is fetched again on the next read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio

from swarmfs.meta.db import Database
from swarmfs.store.cas import ChunkStore

log = logging.getLogger(__name__)

GRACE = 3600.0  # seconds an unreferenced chunk is kept after its last put or fetch
INTERVAL = 60.0


class GarbageCollector:
    def __init__(
        self, db: Database, store: ChunkStore, cache_limit: int, trash_retention: float
    ) -> None:
        self.db = db
        self.store = store
        self.cache_limit = cache_limit
        self.trash_retention = trash_retention
        self.before_collect: Callable[[], Awaitable[object]] | None = None
        """Frees what only the filesystem knows is unused (detached inodes)."""
        self.in_use: Callable[[], frozenset[bytes]] = frozenset
        """Chunks staged for uncommitted writes: unreferenced in the database, yet kept."""

    async def collect(self) -> int:
        if self.before_collect is not None:
            await self.before_collect()
        now = time.time()
        gone = await self.db.write(lambda t: t.expire_trash(now - self.trash_retention))
        keep = self.in_use()
        gone += await self.db.write(lambda t: t.reclaim(now - GRACE, self.cache_limit, keep))
        staged = self.in_use()  # a write may have stored one of them meanwhile (same content)
        gone = [c for c in gone if c not in staged]
        if gone:
            await trio.to_thread.run_sync(lambda: [self.store.delete(c) for c in gone])
            log.info("garbage collection removed %d chunks", len(gone))
        return len(gone)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self.collect()
            except OSError as exc:
                log.warning("garbage collection failed: %s", exc)
            await trio.sleep(INTERVAL)  # a schedule, not a synchronisation
