"""Composition root: builds the layers bottom-up, owns the nursery and the shutdown order.

One trio run holds everything: the control socket, the FUSE session
(``pyfuse3.main``) and the node's services share one nursery. Shutdown order:
commit open files, stop FUSE (unmount), stop services, close the database.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from swarmfs import control, fsck, trash
from swarmfs.config import Config
from swarmfs.crypto.keys import derive_key
from swarmfs.datadir import DataDir
from swarmfs.errors import UserError
from swarmfs.fs.content import ChunkIO
from swarmfs.fs.namespace import Filesystem
from swarmfs.fuse import mount
from swarmfs.fuse.invalidator import Invalidator
from swarmfs.fuse.operations import Operations
from swarmfs.gc import GarbageCollector
from swarmfs.memory import MemoryBudget
from swarmfs.meta.db import Database
from swarmfs.meta.sync import IndexSync
from swarmfs.net.peer import PeerConnection
from swarmfs.store.cas import ChunkStore
from swarmfs.swarm.membership import Membership, MembershipSettings
from swarmfs.swarm.peerstore import SqlitePeerStore
from swarmfs.swarm.replication import ChunkService, Fetcher, Replicator

log = logging.getLogger(__name__)

FUSE_MAX_TASKS = 128  # reads waiting on the network hold at most FETCH_PARALLEL of these


def _clean_start(db: Database, store: ChunkStore, staging_dir: Path) -> None:
    """After a crash: drop staging, half-written chunks, detached inodes and chunks no
    commit ever referenced. Every file then shows its last committed version."""
    staging_dir.mkdir(parents=True, exist_ok=True)
    for leftover in staging_dir.iterdir():
        leftover.unlink(missing_ok=True)
    removed = store.clean_tmp()
    gone = db.write_sync(lambda t: t.drop_hidden())
    known = {bytes(c) for (c,) in db.reader.conn.execute("SELECT chunk_id FROM chunks")}
    stray = [c for c in store.ids() if c not in known and not db.reader.chunk_referenced(c)]
    for c in [*gone, *stray]:
        store.delete(c)
    if removed or stray:
        log.info(
            "start-up clean-up: %d partial and %d unreferenced chunks removed", removed, len(stray)
        )


class Node:
    def __init__(
        self,
        config: Config,
        data_dir: DataDir,
        mountpoint: Path | None,
        network: MembershipSettings | None = None,
    ) -> None:
        """``network``: timeouts and limits of the peer layer (tests shorten them)."""
        self.config = config
        self.data_dir = data_dir
        self.mountpoint = mountpoint
        identity = data_dir.identity()
        self.node_id = identity.node_id
        swarm_key = data_dir.swarm_key()
        self.db = Database(data_dir.db_file, self.node_id)
        self.db.push_new_chunks = config.replicas is None or config.replicas > 1
        self.store = ChunkStore(data_dir.chunks_dir)
        _clean_start(self.db, self.store, data_dir.staging_dir)
        self.memory = MemoryBudget()  # one budget for every chunk-sized buffer (DESIGN §5)
        self.chunks = ChunkIO(self.store, derive_key(swarm_key, "content"), budget=self.memory)
        network = network or MembershipSettings()
        network = replace(
            network,
            connection=replace(
                network.connection, receive_pool=self.memory.receive, send_pool=self.memory.send
            ),
        )
        self.fs = Filesystem(self.db, self.chunks, data_dir.staging_dir)
        self.fs.read_only = "ro" in config.fuse_options
        self.membership = Membership(
            identity,
            swarm_key,
            listen=str(config.listen),
            store=SqlitePeerStore(self.db),
            tls_dir=data_dir.path,
            bootstrap=[str(a) for a in config.bootstrap],
            index_position=lambda: (self.db.reader.index_id(), self.db.sequence),
            settings=network,
        )
        self.sync = IndexSync(self.db, self.chunks, self.fs.remote_applied)
        self.chunk_service = ChunkService(self.db, self.store)
        self.replicator = Replicator(
            self.db, self.store, self.membership, config.replicas, self.memory
        )
        self.chunks.source = Fetcher(self.db, self.membership)
        if self.db.push_new_chunks:
            self.fs.on_chunk_stored = self._queue_push
        self.gc = GarbageCollector(self.db, self.store, config.cache_size, config.trash_retention)
        self.gc.before_collect = self.fs.sweep_detached
        self.gc.in_use = self.fs.staged_chunk_ids
        for msg_type, handler in (
            ("index_since", self.sync.on_index_since),
            ("announce", self.sync.on_announce),
            ("chunk_put", self.chunk_service.on_chunk_put),
            ("chunk_get", self.chunk_service.on_chunk_get),
        ):
            self.membership.register_handler(msg_type, handler)
        self.membership.add_connect_hook(self._peer_connected)
        self.membership.add_connect_hook(self.sync.announce_to)
        self._shutdown = trio.Event()
        self.handle_signals = True

    async def _queue_push(self, chunk_id: bytes, size: int) -> None:
        """A chunk of a file still being written goes out before its commit; a node that
        knows no peer skips this (the commit queues the chunk too, and a peer that
        appears gets it from the repair), saving a transaction per MiB written."""
        if self.membership.peers():
            await self.db.write(lambda t: t.queue_push(chunk_id, size), small=True)

    async def _peer_connected(self, conn: PeerConnection) -> None:
        self.replicator.peer_changed()
        await self.sync.follow(conn)

    def _record_backlog(self) -> int:
        """Changes not yet sent to any peer; none when no peer is known (nobody to tell,
        and a peer that appears pulls everything anyway)."""
        return self.sync.backlog() if self.membership.peers() else 0

    def status(self) -> dict[str, Any]:
        stored, cached = self.db.reader.chunk_bytes()
        backlog_chunks, backlog_bytes = self.db.reader.backlog()
        return {
            "running": True,
            "pid": os.getpid(),
            "node_id": self.node_id,
            "listen": self.membership.listen_address or str(self.config.listen),
            "peers": [p.as_json() for p in self.membership.peers()],
            "files": self.db.reader.count_files(),
            "bytes_stored": stored,
            "bytes_cached": cached,
            "cache_limit": self.config.cache_size,
            "backlog": {
                "chunks": backlog_chunks,
                "bytes": backlog_bytes,
                "records": self._record_backlog(),
            },
            "mountpoint": str(self.mountpoint) if self.mountpoint else None,
        }

    async def _handle_status(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    async def _handle_shutdown(self, request: dict[str, Any]) -> dict[str, Any]:
        """Commit open files, wait (bounded) for new chunks to reach a connected peer, stop."""
        uncommitted = await self.fs.commit_all()
        wait = request.get("wait", 10.0)
        if isinstance(wait, int | float) and wait > 0:
            with trio.move_on_after(wait):
                while self.db.reader.unreplicated() and self.membership.connected_peers():
                    await self.db.wait_write()
        self._shutdown.set()
        return {
            "ok": not uncommitted,
            "uncommitted": uncommitted,
            "backlog": self.status()["backlog"],
        }

    async def _handle_trash_list(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"entries": [e.as_json() for e in trash.entries(self.db.reader)]}

    async def _handle_trash_restore(self, request: dict[str, Any]) -> dict[str, Any]:
        """A user error comes back as ``user_error``: it is no failure of the node's."""
        try:
            changes = await self.db.write(trash.restore_fn(os.fsencode(request["path"])))
        except UserError as exc:
            return {"user_error": str(exc)}
        await self.fs.remote_applied(changes)
        return {"restored": request["path"]}

    async def _handle_fsck(self, request: dict[str, Any]) -> dict[str, Any]:
        key = derive_key(self.data_dir.swarm_key(), "content")
        repair = bool(request.get("repair"))
        report = await trio.to_thread.run_sync(
            lambda: fsck.check(self.db, self.store, key, repair, online=True)
        )
        return report.as_json()

    async def _supervise(self, name: str, service: Callable[[], Awaitable[None]]) -> None:
        """A background service that raises is logged and restarted with backoff; it never
        takes the node (and its FUSE mount) down (DESIGN.md §2)."""
        backoff = 1.0
        while True:
            try:
                await service()
                return
            except Exception:
                log.exception("%s failed; restarting it in %g s", name, backoff)
            await trio.sleep(backoff)  # backoff before a restart
            backoff = min(backoff * 2, 60.0)

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                self._shutdown.set()
                return

    async def _run_fuse(self) -> None:
        try:
            await mount.serve(FUSE_MAX_TASKS)
        finally:
            log.info("FUSE session ended")
            self._shutdown.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        mounted = False
        invalidator = Invalidator()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    control.serve,
                    self.data_dir,
                    {
                        "status": self._handle_status,
                        "shutdown": self._handle_shutdown,
                        "trash_list": self._handle_trash_list,
                        "trash_restore": self._handle_trash_restore,
                        "fsck": self._handle_fsck,
                    },
                )
                if self.handle_signals:
                    nursery.start_soon(self._watch_signals)
                self.chunks.nursery = self.fs.nursery = nursery
                await nursery.start(self.membership.run)
                for name, service in (
                    ("replication", self.replicator.run),
                    ("garbage collection", self.gc.run),
                ):
                    nursery.start_soon(self._supervise, name, service)
                if self.mountpoint is not None:
                    options = mount.fuse_options(self.data_dir.path, self.config.fuse_options)
                    mount.init(Operations(self.fs), self.mountpoint, options)
                    mounted = True
                    self.fs.kernel = invalidator
                    nursery.start_soon(self._run_fuse)
                    await trio.to_thread.run_sync(os.stat, self.mountpoint)
                    mount.raise_readahead(self.mountpoint)  # now that INIT was answered
                    log.info("mounted %s (node %s)", self.mountpoint, self.node_id)
                task_status.started()
                await self._shutdown.wait()
                await self.fs.commit_all()
                if mounted:
                    # the thread may be inside an invalidation that needs this loop to answer
                    self.fs.kernel = None
                    await trio.to_thread.run_sync(invalidator.stop)
                    mount.terminate()
                nursery.cancel_scope.cancel()
        finally:
            self.fs.kernel = None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(invalidator.stop)  # before pyfuse3.close()
            if mounted:
                mount.close(unmount=True)
            self.db.close()
            log.info("node stopped")


async def run_node(
    config: Config,
    data_dir: DataDir,
    mountpoint: Path | None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a node until shutdown; ``started()`` once mounted, bound and answering control."""
    node = Node(config, data_dir, mountpoint)
    await node.run(task_status=task_status)


def offline_status(data_dir: DataDir, config: Config) -> dict[str, Any]:
    """``status`` fields read from the data dir when no node runs there."""
    from swarmfs.meta.db import Queries, _connect

    status: dict[str, Any] = {
        "running": False,
        "pid": None,
        "node_id": data_dir.identity().node_id if data_dir.node_key_file.exists() else None,
        "listen": str(config.listen),
        "peers": [],
        "files": 0,
        "bytes_stored": 0,
        "bytes_cached": 0,
        "cache_limit": config.cache_size,
        "backlog": {"chunks": 0, "bytes": 0, "records": 0},
    }
    if data_dir.db_file.exists():
        q = Queries(_connect(data_dir.db_file))
        try:
            status["files"] = q.count_files()
            status["bytes_stored"], status["bytes_cached"] = q.chunk_bytes()
            chunks, size = q.backlog()
            status["backlog"] = {"chunks": chunks, "bytes": size, "records": 0}
            status["peers"] = [
                {"id": n, "address": a, "connected": False, "last_seen": t, "rtt_ms": None}
                for n, a, t in q.known_peers()
            ]
        finally:
            q.conn.close()
    return status
