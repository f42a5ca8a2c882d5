"""Chunk replication (DESIGN.md §5 "Replication"): push on write, fetch on read.

``Replicator`` drains the push queue: each chunk written here goes to
``replicas - 1`` connected peers in rendezvous order (``None`` = all), several
pushes in flight, retried with backoff, never blocking a writer; a ``no_space``
answer moves the push to the next peer. ``Fetcher`` is the ``ChunkSource`` for
reads: replica holders first, then every other connected peer, each answer
checked against the chunk id before it is used; bounded in time. The handlers
serve ``chunk_put`` (verify, then store) and ``chunk_get``.

Memory (``swarmfs.memory``): a push holds one chunk of the budget's ``push``
pool from before it reads the chunk until its peers answered; the bodies of
incoming puts and outgoing ``chunk`` replies are held by the connection
(``net.peer``) in the ``receive`` and ``send`` pools, and fetches by the reader
(``fs.content``) in ``fetch``.

Runs on the trio loop; hashing and disk I/O go to worker threads.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import trio

from swarmfs import CHUNK_SIZE, SMALL_CHUNK
from swarmfs.crypto.chunks import id_matches
from swarmfs.errors import ChunkMissing, CorruptChunk
from swarmfs.memory import MemoryBudget
from swarmfs.meta.db import Database
from swarmfs.net.peer import PeerConnection, PeerUnavailable
from swarmfs.net.wire import Chunk, ChunkGet, ChunkPut, Error, Message, Missing, Stored
from swarmfs.store.cas import ChunkStore
from swarmfs.swarm.membership import PeerStatus
from swarmfs.swarm.placement import rank

log = logging.getLogger(__name__)

PUSH_WINDOW = 8
FETCH_TIMEOUT = 30.0  # longest wait for any peer to be reachable
HEDGE_AFTER = 2.0  # seconds of silence from the peers asked before the next is asked too
MISSING_MEMORY = 5.0  # seconds a chunk no peer had is not asked for again
FETCH_PARALLEL = 32  # fetches in flight node-wide, so metadata requests always find a worker
NO_SPACE = "no_space"
BAD_CHUNK = "bad_chunk"
DISK_RESERVE = 64 * 1024 * 1024  # refuse replicas before the disk is completely full


class Peers:
    """What replication needs of membership (``swarm.membership.Membership``)."""

    def connected_peers(self) -> list[PeerConnection]: ...  # pragma: no cover

    async def wait_for(self, predicate: Callable[[], bool]) -> None: ...  # pragma: no cover

    def peers(self) -> list[PeerStatus]: ...  # pragma: no cover

    def redial(self, node_ids: Iterable[str]) -> None: ...  # pragma: no cover


class ChunkService:
    """Serves ``chunk_put`` and ``chunk_get`` from this node's store."""

    def __init__(self, db: Database, store: ChunkStore) -> None:
        self.db = db
        self.store = store

    async def on_chunk_get(self, conn: PeerConnection, msg: Message) -> Message:
        assert isinstance(msg, ChunkGet)
        try:
            data = await trio.to_thread.run_sync(self.store.get, msg.chunk_id)
        except ChunkMissing:
            return Missing(chunk_id=msg.chunk_id)
        return Chunk(chunk_id=msg.chunk_id, data=data)

    def _disk_has_room(self, size: int) -> bool:
        return shutil.disk_usage(self.store.root).free > size + DISK_RESERVE

    async def on_chunk_put(self, conn: PeerConnection, msg: Message) -> Message:
        assert isinstance(msg, ChunkPut)
        chunk_id, data = msg.chunk_id, msg.data
        try:  # in a thread even when small: creating a file can take a millisecond
            refusal = await trio.to_thread.run_sync(self._check_and_store, chunk_id, data)
        except OSError as exc:
            log.warning("storing chunk %s from %s failed: %s", chunk_id.hex()[:16], conn, exc)
            return Error(code=NO_SPACE, text=os.strerror(exc.errno or 0))
        if refusal is not None:
            if refusal.code == BAD_CHUNK:
                log.warning("peer %s pushed chunk %s whose content does not match its id",
                            conn, chunk_id.hex()[:16])  # fmt: skip
            return refusal
        await self.db.write(lambda t: t.add_chunk(chunk_id, len(data), pinned=True), small=True)
        return Stored(chunk_id=chunk_id)

    def _check_and_store(self, chunk_id: bytes, data: bytes) -> Error | None:
        """Verify a pushed chunk and store it, in one call (one thread switch at most)."""
        if not id_matches(chunk_id, data):
            return Error(code=BAD_CHUNK, text="content does not match the chunk id")
        # Only the disk refuses a replica: the cache (fetched and retired chunks) is what
        # GC evicts to make room, so comparing with its limit refused replicas for good
        # on a node that merely rewrote its own files.
        if not self._disk_has_room(len(data)):
            return Error(code=NO_SPACE, text="no space for replicas")
        self.store.put(chunk_id, data)
        return None


class Replicator:
    """Drains the push queue; see the module docstring."""

    def __init__(
        self,
        db: Database,
        store: ChunkStore,
        peers: Peers,
        replicas: int | None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.db = db
        self.store = store
        self.peers = peers
        self.replicas = replicas
        self._pool = (budget or MemoryBudget()).push
        self._retry_at: dict[bytes, float] = {}
        self._failures: dict[bytes, int] = {}
        self._peer_change = trio.Event()
        self._repair_wanted = True

    def peer_changed(self) -> None:
        self._repair_wanted = True
        event, self._peer_change = self._peer_change, trio.Event()
        event.set()

    def _wanted(self, connected: list[str]) -> int:
        return len(connected) if self.replicas is None else min(self.replicas - 1, len(connected))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if self.replicas is not None and self.replicas <= 1:
            return  # nothing is pushed; fetch on read still works
        while True:
            peers = {c.peer_id: c for c in self.peers.connected_peers()}
            if not peers:  # nothing to do until someone connects
                await self._peer_change.wait()
                continue
            if self._repair_wanted:  # a peer joined: chunks short of replicas go out again
                self._repair_wanted = False
                want = self._wanted(list(peers))
                await self.db.write(lambda t, w=want: t.requeue_underreplicated(w))
            now = trio.current_time()
            batch = [
                (c, n) for c, n in self.db.reader.push_batch(256)
                if self._retry_at.get(c, 0) <= now
            ]  # fmt: skip
            if not batch:
                with trio.move_on_after(self._next_retry(now)):
                    await _first_of(self.db.wait_write, self._peer_change.wait)
                continue
            limiter = trio.Semaphore(PUSH_WINDOW)
            async with trio.open_nursery() as nursery:
                for chunk_id, size in batch:
                    await limiter.acquire()
                    nursery.start_soon(self._push_one, chunk_id, size, peers, limiter)

    def _next_retry(self, now: float) -> float:
        future = [t - now for t in self._retry_at.values() if t > now]
        return min(future) if future else 3600.0

    async def _push_one(
        self,
        chunk_id: bytes,
        size: int,
        peers: dict[str, PeerConnection],
        limiter: trio.Semaphore,
    ) -> None:
        try:
            holders = self.db.reader.holders(chunk_id)
            want = self._wanted(list(peers))
            done = len(holders & peers.keys())
            if done >= want:  # queued again (by its commit) after it reached its peers
                await self.db.write(lambda t: t.unqueue(chunk_id), small=True)
                return
            async with self._pool.hold(CHUNK_SIZE):
                await self._push_to_peers(chunk_id, size, peers, holders, want, done)
        finally:
            limiter.release()

    async def _push_to_peers(
        self,
        chunk_id: bytes,
        size: int,
        peers: dict[str, PeerConnection],
        holders: set[str],
        want: int,
        done: int,
    ) -> None:
        try:
            if size <= SMALL_CHUNK:  # small files: the thread switch costs more than the read
                data = self.store.get(chunk_id)
            else:
                data = await trio.to_thread.run_sync(self.store.get, chunk_id)
        except ChunkMissing:  # superseded and deleted meanwhile
            await self.db.write(lambda t: t.unqueue(chunk_id), small=True)
            return
        for node_id in rank(chunk_id, peers):
            if done >= want:
                break
            if node_id in holders:
                continue
            try:
                reply = await peers[node_id].request(ChunkPut(chunk_id=chunk_id, data=data))
            except PeerUnavailable as exc:
                log.info("push of %s to %s failed: %s", chunk_id.hex()[:16], node_id[:12], exc)
                continue
            if isinstance(reply, Stored):
                done += 1
                finished = done >= want
                await self.db.write(
                    lambda t, n=node_id, f=finished: t.add_holder(chunk_id, n, f), small=True
                )
            elif isinstance(reply, Error):
                log.info("peer %s refused chunk %s: %s", node_id[:12], chunk_id.hex()[:16],
                         reply.code)  # fmt: skip
        if done < want:
            failures = self._failures.get(chunk_id, 0) + 1
            self._failures[chunk_id] = failures
            self._retry_at[chunk_id] = trio.current_time() + min(60.0, 0.5 * 2**failures)
        else:
            self._failures.pop(chunk_id, None)
            self._retry_at.pop(chunk_id, None)


@dataclass(frozen=True)
class _Answer:
    """How one peer's ask for a chunk ended: ``data`` verified, or ``reached`` (it said it
    lacks the chunk, or served a bad copy) or not (the request failed)."""

    peer: str
    reached: bool
    data: bytes | None = None


class Fetcher:
    """``fs.content.ChunkSource``: fetch a chunk this node lacks from its peers."""

    def __init__(self, db: Database, peers: Peers, timeout: float = FETCH_TIMEOUT) -> None:
        self.db = db
        self.peers = peers
        self.timeout = timeout
        self._slots = trio.Semaphore(FETCH_PARALLEL)
        self._missing: dict[bytes, float] = {}  # chunk id -> until when "nobody has it" holds

    async def fetch(self, chunk_id: bytes, h: bytes, accept: Callable[[bytes], bytes]) -> bytes:
        async with self._slots:
            return await self._fetch(chunk_id, accept)

    async def stored(self, chunk_id: bytes, size: int) -> None:
        """The reader wrote the fetched chunk's cache file: record it (unpinned, evictable)."""
        await self.db.write(lambda t: t.add_chunk(chunk_id, size, pinned=False), small=True)

    async def _fetch(self, chunk_id: bytes, accept: Callable[[bytes], bytes]) -> bytes:
        """Ask the connected peers, holders first, then by round-trip time; the first good
        copy wins. When every peer asked has sent nothing at all for ``HEDGE_AFTER``, the
        next one is asked too: a peer cut off by a partition nobody has noticed yet held
        a whole fetch for its request timeout. (A busy link still delivers bytes, so it
        does not make every chunk travel twice.) Known peers that are not connected are
        redialled and waited for (bounded). A chunk every known peer says it lacks fails
        at once, and is remembered briefly so the kernel's retries do not wait again."""
        now = trio.current_time()
        if self._missing.get(chunk_id, -1.0) > now:
            raise ChunkMissing(f"chunk {chunk_id.hex()[:16]} is on no reachable peer")
        asked: set[str] = set()  # asked on their current connection
        answered: set[str] = set()  # said they lack it, or served a bad copy
        running: dict[str, PeerConnection] = {}
        found: list[bytes] = []
        send, receive = trio.open_memory_channel[_Answer](math.inf)
        hedge = True  # ask the next candidate without waiting for the ones running
        with trio.move_on_after(self.timeout):
            async with trio.open_nursery() as asks:
                while not found:
                    candidates = self._candidates(chunk_id, asked)
                    if candidates and (hedge or not running):
                        conn = candidates[0]
                        asked.add(conn.peer_id)
                        running[conn.peer_id] = conn
                        asks.start_soon(self._ask_into, conn, chunk_id, accept, send)
                        hedge = False
                        continue
                    if not candidates:
                        known = {p.id for p in self.peers.peers()}
                        if not running and answered and known <= answered:
                            break  # every peer this node knows lacks it: it is nowhere
                        self.peers.redial(known - asked)  # not at its backoff time: now
                    answer = await self._next_answer(receive, asked, newcomer=not candidates)
                    if answer is None:  # nothing for a while, or a peer connected
                        hedge = all(c.silent_for >= HEDGE_AFTER for c in running.values())
                        continue
                    conn = running.pop(answer.peer)
                    if answer.data is not None:
                        found.append(answer.data)
                        asks.cancel_scope.cancel()  # the others' answers are not needed
                    elif answer.reached:
                        answered.add(answer.peer)
                    elif conn.closed:
                        asked.discard(answer.peer)  # ask it again once it is back
        if found:
            return found[0]
        known = {p.id for p in self.peers.peers()}
        names = ", ".join(a[:12] for a in sorted(asked | answered)) or "none connected"
        if not answered or not known <= answered:
            log.error("chunk %s: no reachable peer has it (asked: %s)", chunk_id.hex()[:16], names)
            raise ChunkMissing(f"chunk {chunk_id.hex()[:16]}: no reachable peer has it ({names})")
        now = trio.current_time()
        if len(self._missing) > 4096:
            self._missing = {c: t for c, t in self._missing.items() if t > now}
        self._missing[chunk_id] = now + MISSING_MEMORY
        log.error("chunk %s: no peer could provide it (asked: %s)", chunk_id.hex()[:16], names)
        raise ChunkMissing(f"chunk {chunk_id.hex()[:16]} is on no reachable peer (asked: {names})")

    def _candidates(self, chunk_id: bytes, asked: set[str]) -> list[PeerConnection]:
        """Connected peers not asked yet: recorded holders first, then the nearest."""
        holders = self.db.reader.holders(chunk_id)
        candidates = [c for c in self.peers.connected_peers() if c.peer_id not in asked]
        candidates.sort(key=lambda c: (c.peer_id not in holders, c.rtt_ms or 1e9))
        return candidates

    async def _ask_into(
        self,
        conn: PeerConnection,
        chunk_id: bytes,
        accept: Callable[[bytes], bytes],
        answers: trio.MemorySendChannel[_Answer],
    ) -> None:
        try:
            answer = await self._ask(conn, chunk_id, accept)
        except Exception:  # a bug of ours: this peer counts as not reached, the fetch goes on
            log.exception("fetch of %s from %s failed", chunk_id.hex()[:16], conn)
            answer = _Answer(conn.peer_id, reached=False)
        answers.send_nowait(answer)

    async def _next_answer(
        self, answers: trio.MemoryReceiveChannel[_Answer], asked: set[str], newcomer: bool
    ) -> _Answer | None:
        """The next peer's answer; None after ``HEDGE_AFTER`` without one or (``newcomer``:
        nobody is left to ask) once an unasked peer connects."""
        box: list[_Answer] = []

        async def answer() -> None:
            box.append(await answers.receive())

        async def connected() -> None:
            await self.peers.wait_for(
                lambda: any(c.peer_id not in asked for c in self.peers.connected_peers())
            )

        with trio.move_on_after(HEDGE_AFTER):
            await _first_of(answer, *([connected] if newcomer else []))
        return box[0] if box else None

    async def _ask(
        self, conn: PeerConnection, chunk_id: bytes, accept: Callable[[bytes], bytes]
    ) -> _Answer:
        peer = conn.peer_id
        try:
            reply = await conn.request(ChunkGet(chunk_id=chunk_id))
        except PeerUnavailable as exc:
            log.info("fetch of %s from %s failed: %s", chunk_id.hex()[:16], conn, exc)
            return _Answer(peer, reached=False)
        if not isinstance(reply, Chunk):
            return _Answer(peer, reached=True)
        ciphertext = reply.data
        del reply  # the ciphertext goes on to the reader alone

        def check() -> bytes | None:  # id and ``accept`` in one worker-thread call
            return accept(ciphertext) if id_matches(chunk_id, ciphertext) else None

        try:
            result = await trio.to_thread.run_sync(check)
        except CorruptChunk as exc:
            log.warning("peer %s served chunk %s that does not open (%s); skipped",
                        conn, chunk_id.hex()[:16], exc)  # fmt: skip
            return _Answer(peer, reached=True)
        if result is None:
            log.warning("peer %s served chunk %s with wrong content; skipped",
                        conn, chunk_id.hex()[:16])  # fmt: skip
        return _Answer(peer, reached=True, data=result)


async def _first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Wait for all of ``waits`` at once; return when the first returns (the rest are
    cancelled)."""
    async with trio.open_nursery() as nursery:

        async def until(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(until, wait)
