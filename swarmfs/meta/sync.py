"""Index sync (DESIGN.md §5 "Sync"): every node catches up on every record change.

Each change this node applies, local or received, has its own sequence
number. On connecting, this node asks the peer for its records after the last
sequence received from it (remembered per peer and index id, advanced
contiguously in the same transaction as the records), page by page; then
``announce`` pushes arrive live. An announce names the span of this node's
sequence it covers (``after`` to ``sequence``): a receiver that holds
everything up to ``after`` applies it, otherwise it pulls, so nothing is
skipped. That lets a change go to every peer except the one it came from.

Runs on the trio loop; applying is one database write per page.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Protocol

import trio

from swarmfs.errors import ChunkMissing, CorruptChunk
from swarmfs.meta.db import Database, Row
from swarmfs.meta.records import Block, Record
from swarmfs.meta.wireform import (
    INLINE_BLOCKS,
    MANIFEST_ENTRIES,
    InvalidRecord,
    pack_manifest,
    record_from_map,
    record_to_map,
    unpack_manifest,
)
from swarmfs.net.peer import PeerConnection, PeerUnavailable
from swarmfs.net.wire import Announce, Error, Index, IndexSince, Message

log = logging.getLogger(__name__)

PAGE_BYTES = 512 * 1024  # estimated record bytes per index page, well under a frame
PAGE_RECORDS = 2000
ANNOUNCE_INBOX = 64  # announces queued per peer before falling back to a pull

Invalidations = list[tuple[bytes, bytes, int | None, bool]]


class ManifestStore(Protocol):
    """Seals and reads manifest chunks (block lists too long to travel inline)."""

    async def seal_and_store(self, plaintext: bytes) -> tuple[Block, int]: ...

    async def read(self, block: Block) -> bytes: ...


class IndexSync:
    def __init__(
        self,
        db: Database,
        manifests: ManifestStore,
        applied: Callable[[Invalidations], Awaitable[None]],
    ) -> None:
        self.db = db
        self.manifests = manifests
        self._applied = applied
        self._apply_locks: dict[str, trio.Lock] = {}
        self._inbox: dict[str, trio.MemorySendChannel[Announce]] = {}
        self._pull_later: set[str] = set()
        self._announced = db.sequence  # last change some peer has been sent
        self._announcing: dict[PeerConnection, int] = {}  # peer -> last change announced
        self._exported: tuple[tuple[int, ...], list[dict[str, Any]]] | None = None
        self._sources = _Sources()

    def backlog(self) -> int:
        """Changes made or applied here that no peer has been sent yet."""
        return max(0, self.db.sequence - self._announced)

    # -- serving -------------------------------------------------------------------
    async def export(self, page: list[tuple[Row, Record]]) -> list[dict[str, Any]]:
        """Record maps for the wire, each with ``q``: its sequence in this node's index."""
        out = []
        for row, rec in page:
            manifests = None
            if len(rec.blocks) > INLINE_BLOCKS:
                manifests = []
                for i in range(0, len(rec.blocks), MANIFEST_ENTRIES):
                    block, _ = await self.manifests.seal_and_store(
                        pack_manifest(rec.blocks[i : i + MANIFEST_ENTRIES])
                    )
                    manifests.append((block.chunk_id, block.h))
            m = record_to_map(rec, manifests)
            m["q"] = row.sequence
            out.append(m)
        return out

    def _page(self, since: int) -> tuple[list[tuple[Row, Record]], bool]:
        """The changes after ``since`` that fit one frame (estimated generously)."""
        changes = self.db.reader.changes_since_records(since, PAGE_RECORDS)
        total, page = 0, []
        for row, rec in changes:
            total += 200 + len(rec.path) + len(rec.target) + 40 * len(rec.version.counters)
            total += 80 * min(len(rec.blocks), INLINE_BLOCKS)
            if page and total > PAGE_BYTES:
                return page, True
            page.append((row, rec))
        return page, len(changes) == PAGE_RECORDS

    async def on_index_since(self, conn: PeerConnection, msg: Message) -> Message:
        assert isinstance(msg, IndexSince)
        index_id = self.db.reader.index_id()
        since = msg.since if msg.index_id == index_id else 0
        page, more = self._page(since)
        records = await self.export(page)
        last = page[-1][0].sequence if page else since
        self._announced = max(self._announced, last)  # the peer has it now
        return Index(index_id=index_id, sequence=last, records=tuple(records), more=more)

    # -- receiving -------------------------------------------------------------------
    async def _decode(self, conn: PeerConnection, maps: tuple[dict[str, Any], ...]) -> list[Record]:
        out = []
        for m in maps:
            try:
                rec, manifests = record_from_map(m)
                if manifests is not None:
                    blocks: list[Block] = []
                    for chunk_id, h in manifests:
                        blocks += unpack_manifest(await self.manifests.read(Block(chunk_id, h, 0)))
                    rec = _with_blocks(rec, blocks, m.get("n"))
            except InvalidRecord as exc:
                log.warning("peer %s sent an invalid record (%s); skipped", conn, exc)
                continue
            except (ChunkMissing, CorruptChunk) as exc:
                log.warning("peer %s: a record's block list is unavailable (%s)", conn, exc)
                raise PeerUnavailable(str(exc)) from None
            out.append(rec)
        return out

    async def _apply(
        self, conn: PeerConnection, index_id: int, records: list[Record], sequence: int
    ) -> None:
        peer = conn.peer_id

        def txn(t: Any) -> Invalidations:
            for rec in records:
                t.apply_remote(rec)
            t.set_peer_sequence(peer, index_id, sequence)
            noted = list(t.received)
            self._sources.note(noted, peer)  # before the commit the announcer sees
            # a rollback frees these sequences for other changes: forget them at once
            t.on_rollback.append(lambda: self._sources.forget(noted))
            return t.invalidations

        invalidations = await self.db.write(txn, small=not records)
        if invalidations:
            await self._applied(invalidations)

    def _lock(self, peer: str) -> trio.Lock:
        return self._apply_locks.setdefault(peer, trio.Lock())

    async def pull(self, conn: PeerConnection) -> None:
        """Fetch and apply every record the peer changed since we last heard from it."""
        hello = conn.remote_hello
        index_id = hello.index_id if hello is not None else 0
        async with self._lock(conn.peer_id):
            while True:
                since = self.db.reader.peer_sequence(conn.peer_id, index_id)
                reply = await conn.request(IndexSince(index_id=index_id, since=since))
                if isinstance(reply, Error) or not isinstance(reply, Index):
                    log.warning("peer %s refused index_since: %s", conn, reply)
                    return
                index_id = reply.index_id  # a new database over there restarts from 0
                records = await self._decode(conn, reply.records)
                await self._apply(conn, index_id, records, reply.sequence)
                if not reply.more:
                    return

    async def on_announce(self, conn: PeerConnection, msg: Message) -> None:
        """Runs on the connection's reader: only queue, never wait (the reader must keep
        reading the replies that a pull in progress is waiting for)."""
        assert isinstance(msg, Announce)
        inbox = self._inbox.get(conn.peer_id)
        if inbox is None:
            return  # not following yet: the first pull will fetch it
        try:
            inbox.send_nowait(msg)
        except trio.WouldBlock:
            self._pull_later.add(conn.peer_id)  # the inbox is full: catch up by pulling

    async def _take_announce(self, conn: PeerConnection, msg: Announce) -> None:
        async with self._lock(conn.peer_id):
            remembered = self.db.reader.peer_sequence(conn.peer_id, msg.index_id)
            if msg.sequence <= remembered:
                return  # already have all of it
            if msg.after <= remembered:
                fresh = tuple(m for m in msg.records if not _had(m, remembered))
                records = await self._decode(conn, fresh)
                await self._apply(conn, msg.index_id, records, msg.sequence)
                return
        await self.pull(conn)  # a gap: something was missed

    async def follow(self, conn: PeerConnection) -> None:
        """Connect hook: pull now, then apply announces in order, pulling after any gap.

        A request that times out on a connection that stays up (a peer too busy
        to answer) does not end the sync: it pulls again, backing off.
        """
        send, receive = trio.open_memory_channel[Announce](ANNOUNCE_INBOX)
        self._inbox[conn.peer_id] = send
        backoff = 1.0
        try:
            while not conn.closed:
                try:
                    await self.pull(conn)
                    backoff = 1.0
                    async for msg in receive:
                        await self._take_announce(conn, msg)
                        if conn.peer_id in self._pull_later:
                            self._pull_later.discard(conn.peer_id)
                            await self.pull(conn)
                except PeerUnavailable as exc:
                    if conn.closed:
                        log.info("index sync with %s stopped: %s", conn, exc)
                        return
                    log.warning("index sync with %s stalled (%s); retrying", conn, exc)
                except Exception:  # e.g. a database error: retry, never leave the peer behind
                    log.exception("index sync with %s failed; retrying", conn)
                await trio.sleep(backoff)  # backoff before asking again
                backoff = min(backoff * 2, 60.0)
        finally:
            if self._inbox.get(conn.peer_id) is send:
                del self._inbox[conn.peer_id]

    # -- announcing --------------------------------------------------------------------
    async def announce_to(self, conn: PeerConnection) -> None:
        """Connect hook: send the peer every change made or applied here after the
        ``hello`` it was sent (what came before, its own pull fetches), in order, a page
        at a time.

        One task per peer: a peer that stops reading holds back only its own
        announces, and gets fewer, larger pages once it reads again. (One loop sending
        to each peer in turn let a peer whose TCP window was full hold back every
        other peer's announces until its connection died.) A page that fails to go
        out (a bug, a full disk sealing a manifest) is tried again after a pause.
        """
        hello = conn.first_hello
        index_id = self.db.reader.index_id()
        last = hello.sequence if hello and hello.index_id == index_id else self.db.sequence
        self._announcing[conn] = last
        backoff = 1.0
        try:
            while True:
                await self.db.wait_changed(last)
                try:
                    last = self._announcing[conn] = await self._announce_page(conn, last)
                    backoff = 1.0
                except PeerUnavailable:
                    return  # closed: the peer pulls what it missed when it is back
                except Exception:
                    log.exception("announcing to %s failed; trying again in %g s", conn, backoff)
                    self._exported = None
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 60.0)
                    continue
                self._sources.forget_through(min(self._announcing.values()))
        finally:
            del self._announcing[conn]
            if not self._announcing:  # a peer that connects next starts from here
                self._sources.forget_through(self.db.sequence)

    async def _announce_page(self, conn: PeerConnection, last: int) -> int:
        """Send the changes after ``last`` (one page); returns where the peer is now."""
        page, _ = self._page(last)
        if not page:  # only rows no peer is told about: move on without a word
            return self.db.sequence
        newest = page[-1][0].sequence
        records = await self._export_shared(page)
        theirs = tuple(
            m
            for m, (row, _) in zip(records, page, strict=True)
            if self._sources.of(row.sequence) != conn.peer_id
        )
        index_id = self.db.reader.index_id()
        await conn.send(Announce(index_id=index_id, after=last, sequence=newest, records=theirs))
        self._announced = max(self._announced, newest)
        return newest

    async def _export_shared(self, page: list[tuple[Row, Record]]) -> list[dict[str, Any]]:
        """``export`` once for the peers that announce the same page (the usual case).
        Keyed by every sequence in it: a row changed again meanwhile leaves the page."""
        key = tuple(row.sequence for row, _ in page)
        if self._exported is not None and self._exported[0] == key:
            return self._exported[1]
        records = await self.export(page)
        self._exported = (key, records)
        return records


class _Sources:
    """Sequence of an applied change -> the peer it came from unchanged, until announced:
    every other peer gets the change, its source only the new position.

    Filled inside the applying transaction (often in the writer thread), before its
    commit, so the announcer never pages a change whose source is not noted yet; hence
    the lock. Lost on restart, which costs only a redundant announce.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_sequence: OrderedDict[int, str] = OrderedDict()

    def note(self, sequences: list[int], peer: str) -> None:
        with self._lock:
            for seq in sequences:
                self._by_sequence[seq] = peer

    def forget(self, sequences: list[int]) -> None:
        with self._lock:
            for seq in sequences:
                self._by_sequence.pop(seq, None)

    def of(self, sequence: int) -> str | None:
        with self._lock:
            return self._by_sequence.get(sequence)

    def forget_through(self, sequence: int) -> None:
        """Drop what is announced (and any older entry: a change made again later)."""
        with self._lock:
            while self._by_sequence and next(iter(self._by_sequence)) <= sequence:
                self._by_sequence.popitem(last=False)


def _had(m: dict[str, Any], remembered: int) -> bool:
    """The record's sequence in the sender's index is one this node has applied."""
    q = m.get("q")
    return isinstance(q, int) and q <= remembered


def _with_blocks(rec: Record, blocks: list[Block], count: object) -> Record:
    if not isinstance(count, int) or count != len(blocks):
        raise InvalidRecord("manifest block count does not match")
    return replace(rec, blocks=tuple(blocks))
