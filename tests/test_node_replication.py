"""Node level (DESIGN.md §7): whole nodes in one trio run over loopback TLS, no FUSE.

Files are written and read through ``Filesystem`` directly, so index sync,
merge on apply, chunk push and fetch on read are exercised in seconds.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from ports import free_port

from swarmfs import CHUNK_SIZE
from swarmfs.config import Address, Config
from swarmfs.datadir import DataDir
from swarmfs.fs.namespace import READ_AHEAD, Caller, FsError
from swarmfs.meta.db import ROOT_INO
from swarmfs.net.peer import ConnectionSettings, PeerConnection
from swarmfs.net.wire import Announce, Message
from swarmfs.node import Node
from swarmfs.swarm.membership import MembershipSettings
from swarmfs.swarm.replication import HEDGE_AFTER

ME = Caller(uid=0, gid=0, umask=0o022)


class Cluster:
    """Nodes that can be stopped and started again on the same data dir and port."""

    def __init__(
        self,
        nursery: trio.Nursery,
        base: Path,
        config: dict[str, object],
        network: MembershipSettings | None = None,
    ) -> None:
        self.nursery = nursery
        self.network = network
        self.base = base
        self.config = config
        self.ports: list[int] = []
        self.nodes: dict[int, Node] = {}
        self._done: dict[int, trio.Event] = {}

    async def start(self, i: int) -> Node:
        data_dir = DataDir(self.base / f"node{i}")
        if not data_dir.is_initialised():
            first = DataDir(self.base / "node0")
            data_dir.init(first.swarm_key_file if i else None)
            self.ports.append(free_port())
        cfg = Config(
            data_dir=data_dir.path,
            listen=Address("127.0.0.1", self.ports[i]),
            bootstrap=(Address("127.0.0.1", self.ports[0]),) if i else (),
            **self.config,  # type: ignore[arg-type]
        )
        node = Node(cfg, data_dir, None, self.network)
        node.handle_signals = False
        done = self._done[i] = trio.Event()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await node.run(task_status=task_status)
            finally:
                done.set()

        await self.nursery.start(run)
        self.nodes[i] = node
        return node

    async def stop(self, i: int) -> None:
        self.nodes.pop(i)._shutdown.set()
        await self._done[i].wait()


@asynccontextmanager
async def running_nodes(tmp_path: Path, n: int, **config: object) -> AsyncIterator[list[Node]]:
    """``n`` nodes on loopback, each bootstrapped from the first, sharing a swarm key."""
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path, config)
        nodes = [await cluster.start(i) for i in range(n)]
        try:
            yield nodes
        finally:
            for i in list(cluster.nodes):
                await cluster.stop(i)


async def eventually(predicate: Callable[[], object], what: str, timeout: float = 15) -> None:
    """Wait for ``predicate`` on every database write anywhere (no fixed sleeps)."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.02)  # polling a condition, with a deadline
        return
    pytest.fail(f"timed out waiting for {what}")


async def write_file(node: Node, name: bytes, data: bytes) -> None:
    """Create ``name`` or overwrite it (O_TRUNC), then close: one committed version."""
    if has(node, name):
        attr = await node.fs.lookup(ROOT_INO, name)
        fh = await node.fs.open(attr.ino, os.O_WRONLY | os.O_TRUNC)
    else:
        fh, _ = await node.fs.create(ROOT_INO, name, 0o644, os.O_WRONLY, ME)
    await node.fs.write(fh, 0, data)
    await node.fs.flush(fh)
    await node.fs.release(fh)


async def read_file(node: Node, name: bytes) -> bytes:
    attr = await node.fs.lookup(ROOT_INO, name)
    fh = await node.fs.open(attr.ino, os.O_RDONLY)
    try:
        return await node.fs.read(fh, 0, attr.size + 1)
    finally:
        await node.fs.release(fh)


async def write_then_open(writer: Node, reader: Node, name: bytes, data: bytes) -> int:
    """Write ``name`` on ``writer``; once ``reader`` has its record, open it there."""
    await eventually(lambda: reader.membership.connected_peers(), "a connection")
    await write_file(writer, name, data)
    await eventually(lambda: has(reader, name, len(data)), f"{name!r} on the reader")
    attr = await reader.fs.lookup(ROOT_INO, name)
    return await reader.fs.open(attr.ino, os.O_RDONLY)


def has(node: Node, name: bytes, size: int | None = None) -> bool:
    """The node knows a live ``name`` (of ``size`` bytes: the committed version arrived)."""
    row = node.db.reader.by_path(name)
    return row is not None and not row.deleted and (size is None or row.size == size)


async def test_write_on_one_node_reads_everywhere_and_deletes_reach_all(tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK_SIZE + 12345)
    with trio.fail_after(60):
        async with running_nodes(tmp_path, 3) as (a, b, c):
            await eventually(
                lambda: all(len(n.membership.connected_peers()) == 2 for n in (a, b, c)),
                "a full mesh",
            )
            await write_file(a, b"f.bin", data)
            await eventually(
                lambda: has(b, b"f.bin", len(data)) and has(c, b"f.bin", len(data)),
                "the record on b and c",
            )
            assert await read_file(c, b"f.bin") == data
            await eventually(lambda: a.db.reader.backlog() == (0, 0), "the push queue to drain")
            await b.fs.unlink(ROOT_INO, b"f.bin")
            await eventually(lambda: not has(a, b"f.bin") and not has(c, b"f.bin"), "the delete")
            with pytest.raises(FsError) as err:
                await a.fs.lookup(ROOT_INO, b"f.bin")
            assert err.value.errno == errno.ENOENT


async def test_replicas_one_reader_fetches_on_read_and_keeps_it(tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK_SIZE + 7)
    with trio.fail_after(60):
        async with running_nodes(tmp_path, 2, replicas=1) as (a, b):
            await eventually(lambda: b.membership.connected_peers(), "a connection")
            await write_file(a, b"only-on-a", data)
            await eventually(lambda: has(b, b"only-on-a", len(data)), "the record on b")
            assert b.db.reader.chunk_bytes() == (0, 0), "b holds no copy before reading"
            assert await read_file(b, b"only-on-a") == data
            # their cache files are written and recorded behind the read
            await eventually(lambda: b.db.reader.chunk_bytes()[1] > len(data), "cached copies")
            assert b.db.reader.chunk_bytes()[0] == 0, "kept as cache, not as replicas"


async def test_a_sequential_reader_queues_each_chunk_for_read_ahead_once(tmp_path: Path) -> None:
    """Each 1 MiB read asked for the next ``READ_AHEAD`` chunks again, and each ask spawned
    a task even for chunks already queued: the read-ahead slots filled with tasks waiting
    on fetches already running, and fetch on read got ~2 chunks in flight instead of 8."""
    data = os.urandom(24 * CHUNK_SIZE)
    with trio.fail_after(60):
        async with running_nodes(tmp_path, 2, replicas=1) as (a, b):
            fh = await write_then_open(a, b, b"big", data)
            slots = b.fs.chunks._prefetch_slots
            queued = []
            try:
                for offset in range(0, len(data), CHUNK_SIZE):
                    block = await b.fs.read(fh, offset, CHUNK_SIZE)
                    assert block == data[offset : offset + CHUNK_SIZE]
                    queued.append(slots.statistics().tasks_waiting)
            finally:
                await b.fs.release(fh)
            assert max(queued) <= READ_AHEAD, f"read-ahead tasks waiting for a slot: {queued}"


async def test_a_change_is_not_announced_back_to_the_peer_it_came_from(tmp_path: Path) -> None:
    """DESIGN.md §6: an applied change goes to every peer except its source. Echoing it
    back cost the source a decode and a transaction per change: with one peer, creating
    small files took 2.7x as long as alone."""
    with trio.fail_after(60):
        async with running_nodes(tmp_path, 2) as (a, b):
            await eventually(lambda: a.membership.connected_peers(), "a connection")
            from_b: list[bytes] = []

            async def spy(conn: PeerConnection, msg: Message) -> None:
                assert isinstance(msg, Announce)
                from_b.extend(m["p"] for m in msg.records)
                await a.sync.on_announce(conn, msg)

            a.membership.register_handler("announce", spy)
            names = [f"from-a-{i}".encode() for i in range(5)]
            for name in names:
                await write_file(a, name, name)
            await eventually(lambda: all(has(b, n, len(n)) for n in names), "a's files on b")
            await write_file(b, b"from-b", b"b")  # announced after the ones b applied
            await eventually(lambda: has(a, b"from-b", 1), "b's file on a")
            assert b"from-b" in from_b, "the spy sees b's announces"
            echoed = sorted(set(from_b) & set(names))
            assert not echoed, f"b announced a's own changes back to a: {echoed}"


async def test_a_peer_that_does_not_answer_does_not_hold_up_a_fetch(tmp_path: Path) -> None:
    """In a partition not noticed yet, the peer asked first never answers; the fetch used
    to wait for it for the whole fetch timeout (30 s) and fail. The next peer is now asked
    after ``HEDGE_AFTER`` seconds without an answer."""
    data = os.urandom(CHUNK_SIZE + 5)
    async with running_nodes(tmp_path, 3, replicas=1) as (a, b, c):
        with trio.fail_after(30):
            await eventually(lambda: len(b.membership.connected_peers()) == 2, "b's peers")
            await write_file(a, b"only-on-a", data)
            await eventually(lambda: has(b, b"only-on-a", len(data)), "the record on b")

            async def unanswered(conn: PeerConnection, msg: Message) -> Message:
                await trio.sleep_forever()
                raise AssertionError("unreachable")

            c.membership.register_handler("chunk_get", unanswered)
            to_a = b.membership.connection(a.membership.node_id)
            assert to_a is not None
            to_a.rtt_ms = 1e6  # b asks c, the nearest, first
        with trio.fail_after(3 * HEDGE_AFTER):
            assert await read_file(b, b"only-on-a") == data


async def test_a_holder_whose_connection_dropped_mid_fetch_is_asked_again(
    tmp_path: Path,
) -> None:
    """A request that failed with the connection used to count as "it lacks the chunk":
    with the other peer answering "missing", the read failed at once (and for 5 s more)
    although the holder was back a second later."""
    data = os.urandom(CHUNK_SIZE // 2)
    async with running_nodes(tmp_path, 3, replicas=1) as (_, b, c):
        with trio.fail_after(30):
            await eventually(lambda: len(b.membership.connected_peers()) == 2, "b's peers")
            await write_file(c, b"only-on-c", data)
            await eventually(lambda: has(b, b"only-on-c", len(data)), "the record on b")
            dropped: list[str] = []
            serve = c.chunk_service.on_chunk_get

            async def drop_first(conn: PeerConnection, msg: Message) -> Message:
                if not dropped:
                    dropped.append(conn.peer_id)
                    await conn.aclose()  # the link fails under the request
                return await serve(conn, msg)

            c.membership.register_handler("chunk_get", drop_first)
            assert await read_file(b, b"only-on-c") == data
            assert dropped == [b.membership.node_id], "b asked c, and lost the connection"


async def test_concurrent_edits_keep_both_versions(tmp_path: Path) -> None:
    """Syncthing's two-process conflict test: each side edits while the other is down."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            cluster = Cluster(nursery, tmp_path, {})
            a, b = await cluster.start(0), await cluster.start(1)
            await eventually(lambda: b.membership.connected_peers(), "a connection")
            await write_file(a, b"doc.txt", b"base")
            await eventually(lambda: has(b, b"doc.txt", 4), "the first version on b")
            await cluster.stop(1)
            await write_file(a, b"doc.txt", b"edit from a")
            await cluster.stop(0)
            b = await cluster.start(1)
            await write_file(b, b"doc.txt", b"edit from b, later")
            a = await cluster.start(0)

            def names(node: Node) -> list[bytes]:
                return [r.name for r, _ in node.db.reader.entries(b"", 0, 100)]

            def both_versions(node: Node) -> bool:
                return any(b"sync-conflict" in n for n in names(node))

            await eventually(lambda: both_versions(a) and both_versions(b), "the conflict copy")
            for node in (a, b):
                copy = next(n for n in names(node) if b"sync-conflict" in n)
                await eventually(lambda n=node, c=copy: has(n, c, 11) or has(n, c, 18), "content")
                contents = {await read_file(node, b"doc.txt"), await read_file(node, copy)}
                assert contents == {b"edit from a", b"edit from b, later"}
            assert await read_file(a, b"doc.txt") == b"edit from b, later", "the later edit wins"
            for i in (0, 1):
                await cluster.stop(i)


async def test_long_block_lists_travel_in_manifest_chunks(tmp_path: Path) -> None:
    """A file of more than 1 024 chunks (sparse here) replicates through manifests."""
    offset = 1500 * CHUNK_SIZE + 5
    with trio.fail_after(60):
        async with running_nodes(tmp_path, 2) as (a, b):
            await eventually(lambda: b.membership.connected_peers(), "a connection")
            fh, _ = await a.fs.create(ROOT_INO, b"sparse", 0o644, os.O_WRONLY, ME)
            await a.fs.write(fh, 0, b"head")
            await a.fs.write(fh, offset, b"tail")
            await a.fs.flush(fh)
            await a.fs.release(fh)
            await eventually(lambda: has(b, b"sparse", offset + 4), "the sparse file on b")
            attr = await b.fs.lookup(ROOT_INO, b"sparse")
            fh = await b.fs.open(attr.ino, os.O_RDONLY)
            assert await b.fs.read(fh, 0, 4) == b"head"
            assert await b.fs.read(fh, offset - 2, 6) == b"\0\0tail"
            await b.fs.release(fh)


async def test_sync_survives_a_peer_that_stalls_without_disconnecting(tmp_path: Path) -> None:
    """A request timing out on a live connection used to end index sync for good."""
    quick = MembershipSettings(connection=ConnectionSettings(request_timeout=0.5))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            cluster = Cluster(nursery, tmp_path, {}, quick)
            a = await cluster.start(0)
            stalled = trio.Event()
            serve = a.sync.on_index_since

            async def stall_first(conn: object, msg: object) -> object:
                if not stalled.is_set():
                    stalled.set()
                    await trio.sleep_forever()  # a peer too busy to answer, link still up
                return await serve(conn, msg)  # type: ignore[arg-type]

            a.membership.register_handler("index_since", stall_first)
            await write_file(a, b"before.txt", b"written before b joined")
            b = await cluster.start(1)
            await stalled.wait()
            await eventually(lambda: has(b, b"before.txt", 23), "the record despite the stall")
            await write_file(a, b"after.txt", b"and one after")
            await eventually(lambda: has(b, b"after.txt", 13), "later records too")
            for i in (0, 1):
                await cluster.stop(i)


async def test_chunks_pushed_before_their_commit_leave_the_backlog(tmp_path: Path) -> None:
    """Full chunks go out while the file is still open; the commit queues them again,
    and the queue must notice they already reached their peers (it used to spin)."""
    data = os.urandom(2 * CHUNK_SIZE)
    with trio.fail_after(60):
        async with running_nodes(tmp_path, 2) as (a, b):
            await eventually(lambda: b.membership.connected_peers(), "a connection")
            fh, _ = await a.fs.create(ROOT_INO, b"open.bin", 0o644, os.O_WRONLY, ME)
            await a.fs.write(fh, 0, data)
            await eventually(lambda: b.db.reader.chunk_bytes()[0] > len(data), "pushes to b")
            await eventually(lambda: a.db.reader.backlog() == (0, 0), "the pushes acknowledged")
            await a.fs.flush(fh)
            await a.fs.release(fh)
            await eventually(lambda: a.db.reader.backlog() == (0, 0), "an empty backlog")


async def test_every_save_of_a_file_changed_remotely_while_open_survives(tmp_path: Path) -> None:
    """An open file replaced by a peer is offered back on each commit; the second save
    used to repeat the first one's version and vanish in the merge."""
    with trio.fail_after(60):
        async with running_nodes(tmp_path, 2) as (a, b):
            await eventually(lambda: b.membership.connected_peers(), "a connection")
            await write_file(a, b"shared.txt", b"v0")
            await eventually(lambda: has(b, b"shared.txt", 2), "v0 on b")
            attr = await b.fs.lookup(ROOT_INO, b"shared.txt")
            fh = await b.fs.open(attr.ino, os.O_RDWR)
            await write_file(a, b"shared.txt", b"remote edit")
            await eventually(lambda: has(b, b"shared.txt", 11), "the remote edit on b")
            for content in (b"first local save", b"second local save!"):
                await b.fs.write(fh, 0, content)
                await b.fs.flush(fh)

            def contents(node: Node) -> set[bytes]:
                return {r.name for r, _ in node.db.reader.entries(b"", 0, 100)}

            async def all_content(node: Node) -> set[bytes]:
                return {await read_file(node, name) for name in contents(node)}

            for node in (a, b):
                await eventually(
                    lambda n=node: any(
                        r.size == len(b"second local save!")
                        for r, _ in n.db.reader.entries(b"", 0, 100)
                    ),
                    "the second save everywhere",
                )
                found = await all_content(node)
                assert b"second local save!" in found and b"remote edit" in found
            await b.fs.release(fh)


async def test_a_reader_of_the_replaced_version_still_gets_its_chunks(tmp_path: Path) -> None:
    """An open handle on b keeps the version it opened, whose chunks only a holds; a
    rewrite on a used to delete them at once, so b's next read got EIO."""
    old, new = os.urandom(3 * CHUNK_SIZE), os.urandom(3 * CHUNK_SIZE)
    with trio.fail_after(60):
        async with running_nodes(tmp_path, 2, replicas=1) as (a, b):
            fh = await write_then_open(a, b, b"doc", old)
            try:
                version_seen = a.db.reader.by_path(b"doc").version  # type: ignore[union-attr]
                await write_file(a, b"doc", new)
                await eventually(
                    lambda: b.db.reader.by_path(b"doc").version != version_seen,  # type: ignore[union-attr]
                    "the rewrite on b",
                )
                assert await b.fs.read(fh, 0, len(old) + 1) == old
            finally:
                await b.fs.release(fh)
            assert await read_file(b, b"doc") == new


async def test_replicas_of_a_replaced_version_outlive_it_for_the_grace_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica holder applying a newer version used to delete the old chunks at its
    next GC (the replaced inode was swept), under peers still reading that version."""
    old, new = os.urandom(2 * CHUNK_SIZE), os.urandom(2 * CHUNK_SIZE)
    with trio.fail_after(60):
        async with running_nodes(tmp_path, 2) as (a, b):
            await eventually(lambda: b.membership.connected_peers(), "a connection")
            await write_file(a, b"f", old)
            await eventually(lambda: a.db.reader.backlog() == (0, 0), "b holding replicas")
            old_chunks = set(b.store.ids())
            assert len(old_chunks) == 2
            await write_file(a, b"f", new)
            await eventually(lambda: has(b, b"f", len(new)), "the new version on b")
            await eventually(lambda: a.db.reader.backlog() == (0, 0), "b holding its replicas")
            await b.gc.collect()
            assert old_chunks <= set(b.store.ids()), "kept while peers may read them"
            assert set(b.store.ids()) == set(b.db.reader.check_inventory())
            monkeypatch.setattr("swarmfs.gc.GRACE", 0.0)
            await b.gc.collect()
            assert not old_chunks & set(b.store.ids()), "collected once the grace is over"
            assert await read_file(b, b"f") == new


async def test_a_full_read_cache_does_not_refuse_replicas(tmp_path: Path) -> None:
    """Replicas were refused with no_space once fetched or retired chunks filled the read
    cache, so a node that had only rewritten its own files stopped taking replicas."""
    data = os.urandom(2 * CHUNK_SIZE)
    with trio.fail_after(60):
        async with running_nodes(tmp_path, 2, cache_size=1) as (a, b):
            await eventually(lambda: b.membership.connected_peers(), "a connection")
            await write_file(a, b"f", data)
            await eventually(lambda: a.db.reader.backlog() == (0, 0), "b holding replicas")
            stored, _ = b.db.reader.chunk_bytes()
            assert stored > len(data)
