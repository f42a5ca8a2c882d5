"""The node-wide memory budget bounds chunk buffers (DESIGN.md §5 "Resources").

A peer that pushes 32 chunks at once, or asks for 32 at once, must not make
this node hold 32 chunk bodies; read-ahead must not hold more than its pool
either. The bounds are read from the pools' own counters (``used``/``peak``).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from swarmfs import CHUNK_SIZE
from swarmfs.crypto import chunks as chunk_crypto
from swarmfs.errors import ChunkMissing
from swarmfs.fs.content import ChunkIO
from swarmfs.memory import MemoryBudget, Pool
from swarmfs.meta.records import Block
from swarmfs.net.peer import MAX_IN_FLIGHT, ConnectionSettings, PeerConnection
from swarmfs.net.wire import (
    MAX_FRAME,
    Chunk,
    ChunkGet,
    ChunkPut,
    FrameDecoder,
    Message,
    Ping,
    Stored,
    decode_message,
    encode_frame,
)
from swarmfs.store.cas import ChunkStore

MiB = 1024 * 1024
KEY = bytes(range(32))


@asynccontextmanager
async def raw_peer(
    handlers: dict, settings: ConnectionSettings
) -> AsyncIterator[tuple[PeerConnection, trio.abc.Stream]]:
    left, right = trio.testing.memory_stream_pair()
    conn = PeerConnection(
        left, peer_id="r" * 26, address="raw:1", outbound=False, handlers=handlers,
        settings=settings,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        yield conn, right
        nursery.cancel_scope.cancel()


class Gate:
    """Handlers that wait until released, counting how many are inside at once."""

    def __init__(self) -> None:
        self.inside = 0
        self.most = 0
        self.entered = 0
        self.open = trio.Event()

    async def enter(self) -> None:
        self.inside += 1
        self.entered += 1
        self.most = max(self.most, self.inside)
        try:
            await self.open.wait()
        finally:
            self.inside -= 1


async def wait_until(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.testing.wait_all_tasks_blocked()
        if not condition():
            await trio.sleep(0.01)


async def test_incoming_puts_wait_for_the_receive_pool_before_their_bodies() -> None:
    """32 chunk_puts at once: at most the pool's worth of bodies is read and handled."""
    pool = Pool("receive", 4 * MiB + 4 * 1024)
    gate = Gate()

    async def on_put(peer: PeerConnection, msg: Message) -> Message:
        assert isinstance(msg, ChunkPut)
        await gate.enter()
        return Stored(chunk_id=msg.chunk_id)

    body = bytes(CHUNK_SIZE + 17)
    settings = ConnectionSettings(receive_pool=pool)
    with trio.fail_after(20):
        async with raw_peer({"chunk_put": on_put}, settings) as (conn, far):
            async with trio.open_nursery() as nursery:

                async def push_all() -> None:
                    for i in range(1, MAX_IN_FLIGHT + 1):
                        cid = i.to_bytes(32, "big")
                        await far.send_all(encode_frame(ChunkPut(id=i, chunk_id=cid, data=body)))

                nursery.start_soon(push_all)
                await wait_until(lambda: gate.inside == 4 and pool.used > 4 * len(body) - 1)
                await trio.testing.wait_all_tasks_blocked()
                assert gate.inside == 4  # the reader waits for memory, not for the handlers
                assert pool.used <= pool.limit
                gate.open.set()
                decoder, replies = FrameDecoder(), []
                while len(replies) < MAX_IN_FLIGHT:
                    for frame in decoder.feed(await far.receive_some()):
                        if not isinstance(reply := decode_message(frame), Ping):
                            replies.append(reply)
            assert all(isinstance(r, Stored) for r in replies)
            assert gate.entered == MAX_IN_FLIGHT and gate.most == 4
            assert pool.peak <= pool.limit and pool.used == 0
            assert not conn.closed


async def test_chunk_replies_wait_for_the_send_pool_before_the_handler_runs() -> None:
    """32 chunk_gets from a peer that does not read: only the send pool's worth is loaded."""
    pool = Pool("send", 3 * MAX_FRAME)
    gate = Gate()
    data = bytes(CHUNK_SIZE + 17)

    async def on_get(peer: PeerConnection, msg: Message) -> Message:
        assert isinstance(msg, ChunkGet)
        await gate.enter()
        return Chunk(chunk_id=msg.chunk_id, data=data)

    settings = ConnectionSettings(send_pool=pool)
    with trio.fail_after(20):
        async with raw_peer({"chunk_get": on_get}, settings) as (conn, far):
            frames = b"".join(
                encode_frame(ChunkGet(id=i, chunk_id=i.to_bytes(32, "big")))
                for i in range(1, MAX_IN_FLIGHT + 1)
            )
            await far.send_all(frames)
            await wait_until(lambda: gate.inside == 3)
            await trio.testing.wait_all_tasks_blocked()
            assert gate.inside == 3 and pool.used == pool.limit
            gate.open.set()
            decoder, replies = FrameDecoder(), []
            while len(replies) < MAX_IN_FLIGHT:
                for frame in decoder.feed(await far.receive_some()):
                    if not isinstance(reply := decode_message(frame), Ping):  # keepalive
                        replies.append(reply)
            assert all(isinstance(r, Chunk) and r.data == data for r in replies)
            assert gate.most <= 3 and pool.peak <= pool.limit and pool.used == 0
            assert not conn.closed


class SlowSource:
    """A ``ChunkSource`` serving sealed chunks after the gate opens."""

    def __init__(self, sealed: dict[bytes, bytes]) -> None:
        self.sealed = sealed
        self.gate = Gate()
        self.stored_ids: list[bytes] = []

    async def fetch(self, chunk_id: bytes, h: bytes, accept: Callable[[bytes], bytes]) -> bytes:
        await self.gate.enter()
        if chunk_id not in self.sealed:
            raise ChunkMissing("nowhere")
        ciphertext = self.sealed[chunk_id]
        assert chunk_crypto.id_matches(chunk_id, ciphertext)
        return await trio.to_thread.run_sync(accept, ciphertext)

    async def stored(self, chunk_id: bytes, size: int) -> None:
        self.stored_ids.append(chunk_id)


async def test_read_ahead_and_fetches_stay_within_the_fetch_pool(tmp_path: Path) -> None:
    """A read-ahead of 16 missing chunks fetches only as many at once as the pool holds,
    answers from memory, and writes the cache files behind the reader."""
    budget = MemoryBudget(total=16 * MiB)
    per_load = 2 * CHUNK_SIZE
    at_once = budget.fetch.limit // per_load
    assert 1 <= at_once < 16
    store = ChunkStore(tmp_path / "chunks")
    blocks, sealed, plain = [], {}, {}
    for i in range(16):
        data = bytes([i]) * CHUNK_SIZE
        s = chunk_crypto.seal(KEY, data)
        blocks.append(Block(s.chunk_id, s.h, s.length))
        sealed[s.chunk_id] = s.ciphertext
        plain[s.chunk_id] = data
    source = SlowSource(sealed)
    io = ChunkIO(store, KEY, source=source, budget=budget)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            io.nursery = nursery
            io.prefetch(blocks)
            await wait_until(lambda: source.gate.inside == at_once)
            await trio.testing.wait_all_tasks_blocked()
            assert source.gate.inside == at_once
            assert budget.fetch.used <= budget.fetch.limit
            source.gate.open.set()
            for block in blocks:
                assert block.chunk_id is not None
                assert await io.read(block) == plain[block.chunk_id]
            await wait_until(lambda: budget.fetch.used == 0)
        io.nursery = None
    assert source.gate.most == at_once
    assert budget.fetch.peak <= budget.fetch.limit
    assert budget.cache.peak <= budget.cache.limit
    assert sorted(source.stored_ids) == sorted(sealed)  # every cache file written, recorded
    for cid, ciphertext in sealed.items():
        assert store.get(cid) == ciphertext


class HeldStore(ChunkStore):
    """A chunk store whose writes wait (in their worker thread) until released."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.release = threading.Event()

    def put(self, chunk_id: bytes, ciphertext: bytes, *, overwrite: bool = False) -> bool:
        self.release.wait(10)
        return super().put(chunk_id, ciphertext, overwrite=overwrite)


async def test_a_chunk_read_again_while_its_cache_file_is_written_is_not_fetched_again(
    tmp_path: Path,
) -> None:
    """Regression test: a chunk evicted from the decrypted cache before its cache file
    was written was fetched from the peer a second time (seen under load as a chunk
    recorded twice)."""
    data = b"\7" * CHUNK_SIZE
    s = chunk_crypto.seal(KEY, data)
    block = Block(s.chunk_id, s.h, s.length)
    source = SlowSource({s.chunk_id: s.ciphertext})
    source.gate.open.set()
    store = HeldStore(tmp_path / "chunks")
    io = ChunkIO(store, KEY, source=source, budget=MemoryBudget(total=16 * MiB))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            io.nursery = nursery
            try:
                assert await io.read(block) == data
                io.forget([s.chunk_id])  # evicted while its cache file is still being written
                assert await io.read(block) == data
                fetches = source.gate.entered
            finally:
                store.release.set()
        io.nursery = None
    assert fetches == 1
    assert source.stored_ids == [s.chunk_id]
    assert store.get(s.chunk_id) == s.ciphertext


async def test_a_reader_closed_while_it_waits_for_the_receive_pool_took_nothing() -> None:
    """A header announces a chunk-sized body while the pool is full; the connection
    closes while its reader waits for room. It must give back only what it took, so
    the pool counts exactly what the other holders hold, and they can free it all."""
    pool = Pool("receive", 2 * MiB)
    frame = encode_frame(ChunkPut(id=1, chunk_id=bytes(32), data=bytes(CHUNK_SIZE)))
    settings = ConnectionSettings(receive_pool=pool)
    pool.take(pool.limit)  # other connections' bodies
    with trio.fail_after(5):
        async with raw_peer({}, settings) as (conn, far):
            await far.send_all(frame[:4096])  # the header and the start of the body
            await trio.testing.wait_all_tasks_blocked()
            assert pool.used == pool.limit  # the reader waits for room
            await conn.aclose()
    assert pool.used == pool.limit
    pool.release(pool.limit)
    assert pool.used == 0


async def test_a_frame_trickled_below_the_minimum_rate_is_cut_and_frees_its_bytes(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer announces a chunk-sized frame and sends a byte a second, so it is never
    silent: its connection is closed when the frame's bound runs out (one warning
    line), its reservation is freed, and an honest peer's put, which waited for
    that room, is served."""
    pool = Pool("receive", 2 * MiB + 64 * 1024)
    settings = ConnectionSettings(
        receive_pool=pool, frame_timeout=5, frame_min_rate=64 * 1024, dead_after=20
    )
    put = encode_frame(ChunkPut(id=1, chunk_id=bytes(32), data=bytes(CHUNK_SIZE)))
    bound = settings.frame_time(len(put) - 4)  # 16 s: the rate term, not the floor
    assert bound > settings.frame_timeout

    handled_at: list[float] = []

    async def on_put(peer: PeerConnection, msg: Message) -> Message:
        assert isinstance(msg, ChunkPut)
        handled_at.append(trio.current_time())
        return Stored(chunk_id=msg.chunk_id)

    pool.take(MiB)  # other connections' bodies
    with trio.fail_after(10 * bound):
        async with (
            raw_peer({"chunk_put": on_put}, settings) as (slow, slow_far),
            raw_peer({"chunk_put": on_put}, settings) as (honest, honest_far),
        ):
            start = trio.current_time()
            await slow_far.send_all(put[:4096])
            await wait_until(lambda: pool.used > MiB)  # the slow frame holds its bytes

            async def trickle() -> None:
                for i in range(4096, len(put)):
                    # the attacker's pace, not a wait for a condition: one byte per second of
                    # the autojump clock, so the connection is never silent for dead_after
                    await trio.sleep(1)
                    try:
                        await slow_far.send_all(put[i : i + 1])
                    except trio.BrokenResourceError:
                        return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                await honest_far.send_all(put)  # waits for the pool behind the slow one
                await slow.wait_closed()
                closed_after = trio.current_time() - start
                nursery.cancel_scope.cancel()
            assert bound <= closed_after <= bound + 2
            assert slow.close_reason == (
                f"frame of {len(put) - 4} bytes not received within {bound:.3g} s"
            )
            decoder = FrameDecoder()
            while True:
                frames = decoder.feed(await honest_far.receive_some())
                if stored := [m for f in frames if not isinstance(m := decode_message(f), Ping)]:
                    break
            assert stored == [Stored(id=1, chunk_id=bytes(32))]
            assert len(handled_at) == 1 and handled_at[0] - start >= closed_after  # it waited
            assert not honest.closed
            await wait_until(lambda: pool.used == MiB)  # only the others' bytes are held
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [w.getMessage() for w in warnings] == [
        f"connection with {slow} closed: {slow.close_reason}"
    ]


async def test_a_fetch_whose_cache_write_cannot_start_gives_its_memory_back(
    tmp_path: Path,
) -> None:
    """At shutdown the nursery that writes fetched chunks behind the reader is closed:
    the fetch fails to hand its chunk over, and no byte of the fetch pool stays held."""
    budget = MemoryBudget(total=16 * MiB)
    data = b"\5" * CHUNK_SIZE
    s = chunk_crypto.seal(KEY, data)
    source = SlowSource({s.chunk_id: s.ciphertext})
    source.gate.open.set()
    io = ChunkIO(ChunkStore(tmp_path / "chunks"), KEY, source=source, budget=budget)
    async with trio.open_nursery() as closed:
        pass
    io.nursery = closed
    with trio.fail_after(5), pytest.raises(RuntimeError, match="closed"):
        await io.read(Block(s.chunk_id, s.h, s.length))
    assert budget.fetch.used == 0


async def test_a_pool_serves_its_waiters_in_order() -> None:
    """A large waiter was overtaken by every smaller request that fitted a partly freed
    pool, so a steady flood could keep it waiting for ever."""
    pool = Pool("test", 2)
    pool.take(2)
    order: list[str] = []

    async def wants(name: str, size: int) -> None:
        await pool.acquire(size)
        order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wants, "big", 2)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(wants, "small", 1)
        await trio.testing.wait_all_tasks_blocked()
        pool.release(1)  # room for the small one, not yet for the big one ahead of it
        await trio.testing.wait_all_tasks_blocked()
        assert order == []
        pool.release(1)
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["big"]
        pool.release(2)
    assert order == ["big", "small"]
    pool.release(1)
    assert pool.used == 0


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    """A waiter that gives up must not keep blocking the ones queued behind it."""
    pool = Pool("test", 2)
    pool.take(2)
    got_small = trio.Event()
    cancel = trio.CancelScope()

    async def big() -> None:
        with cancel:
            await pool.acquire(2)

    async def small() -> None:
        await pool.acquire(1)
        got_small.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(big)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(small)
            await trio.testing.wait_all_tasks_blocked()
            pool.release(1)  # fits the small one, but the big one is ahead
            assert not got_small.is_set()
            cancel.cancel()
            await got_small.wait()
    assert pool.used == 2


SEAL_FAULTS = """
import os, resource, sys
from swarmfs.crypto import chunks
from swarmfs.memory import tune_malloc
if sys.argv[1] == "tuned":
    tune_malloc()
key, data = os.urandom(32), [os.urandom(1 << 20) for _ in range(4)]
for d in data:  # warm up: the heap grows to its working size once
    chunks.seal(key, d)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    for d in data:
        chunks.seal(key, d)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 32)
"""


def _faults_per_seal(mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", SEAL_FAULTS, mode], capture_output=True, text=True, check=True
    )
    return float(done.stdout)


def test_sealing_chunks_reuses_freed_buffers_instead_of_faulting_them_in() -> None:
    """glibc returned each freed 1 MiB buffer to the kernel (its default trim threshold),
    so every chunk faulted its pages in again: ~480 faults and 0.8 ms of 2.0 per seal."""
    assert _faults_per_seal("tuned") < 16, "a 1 MiB chunk is 256 pages"
