"""One PeerConnection over in-memory streams: dispatch, limits, keepalive, closing.

The far end is either a second PeerConnection or a raw stream the test drives
frame by frame. Keepalive tests run on trio's autojump clock, so minutes of
silence take no real time.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from swarmfs.net.peer import MAX_IN_FLIGHT, ConnectionSettings, PeerConnection, PeerUnavailable
from swarmfs.net.wire import (
    INTERNAL,
    UNKNOWN_TYPE,
    Announce,
    ChunkGet,
    Error,
    FrameDecoder,
    Hello,
    Message,
    Missing,
    Ping,
    Pong,
    UnknownRequest,
    decode_frames,
    encode_frame,
)

CHUNK = b"\7" * 32


async def _missing(peer: PeerConnection, msg: Message) -> Message:
    assert isinstance(msg, ChunkGet)
    await trio.sleep(0)  # let requests overlap
    return Missing(chunk_id=msg.chunk_id)


@asynccontextmanager
async def pair(
    handlers: dict | None = None, settings: ConnectionSettings | None = None
) -> AsyncIterator[tuple[PeerConnection, PeerConnection]]:
    left, right = trio.testing.memory_stream_pair()
    a = PeerConnection(
        left, peer_id="b" * 26, address="b:1", outbound=True, handlers={}, settings=settings
    )
    b = PeerConnection(
        right,
        peer_id="a" * 26,
        address="a:1",
        outbound=False,
        handlers=handlers or {},
        settings=settings,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        yield a, b
        await a.aclose()
        await b.aclose()


@asynccontextmanager
async def raw_peer(
    settings: ConnectionSettings | None = None, handlers: dict | None = None
) -> AsyncIterator[tuple[PeerConnection, trio.abc.Stream]]:
    """A connection whose far end is a bare stream under the test's control."""
    left, right = trio.testing.memory_stream_pair()
    conn = PeerConnection(
        left,
        peer_id="r" * 26,
        address="raw:1",
        outbound=True,
        handlers=handlers or {},
        settings=settings,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        yield conn, right
        await conn.aclose()


async def test_a_request_that_arrives_with_the_hello_is_served() -> None:
    """The peer's hello and its first request in one read: the hello exchange takes the
    hello and leaves the request in the decoder for the read loop, which answers it."""
    left, right = trio.testing.memory_stream_pair()
    conn = PeerConnection(
        left, peer_id="r" * 26, address="raw:1", outbound=True,
        handlers={"chunk_get": _missing},
    )  # fmt: skip
    theirs = Hello(listen="127.0.0.1:7000")
    with trio.fail_after(5):
        await right.send_all(encode_frame(theirs) + encode_frame(ChunkGet(id=7, chunk_id=CHUNK)))
        assert await conn.exchange_hello(Hello()) == theirs
        async with trio.open_nursery() as nursery:
            await nursery.start(conn.run)
            ours, reply = await _read(right, 2, skip_pings=True)
            assert isinstance(ours, Hello)
            assert reply == Missing(id=7, chunk_id=CHUNK)
            await conn.aclose()


async def test_many_requests_in_flight_get_their_own_replies() -> None:
    with trio.fail_after(5):
        async with pair({"chunk_get": _missing}) as (a, _):
            replies: dict[int, Message] = {}

            async def ask(i: int) -> None:
                replies[i] = await a.request(ChunkGet(chunk_id=bytes([i]) * 32))

            async with trio.open_nursery() as nursery:
                for i in range(3 * MAX_IN_FLIGHT):
                    nursery.start_soon(ask, i)
            for i, reply in replies.items():
                assert isinstance(reply, Missing) and reply.chunk_id == bytes([i]) * 32
            assert len(replies) == 3 * MAX_IN_FLIGHT


async def test_unserved_and_unknown_types_get_an_error_reply() -> None:
    with trio.fail_after(5):
        async with raw_peer() as (conn, far):
            await far.send_all(encode_frame(ChunkGet(id=5, chunk_id=CHUNK)))
            await far.send_all(encode_frame(UnknownRequest(type_name="teleport", id=6)))
            got = await _read(far, 2, skip_pings=True)
            assert [(m.id, m.code) for m in got if isinstance(m, Error)] == [
                (5, UNKNOWN_TYPE),
                (6, UNKNOWN_TYPE),
            ]
            assert not conn.closed


async def test_a_failing_handler_is_a_logged_bug_not_a_dead_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(peer: PeerConnection, msg: Message) -> Message:
        raise RuntimeError("bug")

    with trio.fail_after(5):
        async with pair({"chunk_get": broken}) as (a, _):
            reply = await a.request(ChunkGet(chunk_id=CHUNK))
            assert isinstance(reply, Error) and reply.code == INTERNAL
            assert isinstance(await a.request(Ping()), Pong)
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.exc_info is not None  # a bug: logged with its traceback


async def test_pushes_are_handled_in_order() -> None:
    seen: list[int] = []
    all_seen = trio.Event()

    async def on_announce(peer: PeerConnection, msg: Message) -> None:
        assert isinstance(msg, Announce)
        await trio.sleep(0)
        seen.append(msg.sequence)
        if len(seen) == 50:
            all_seen.set()

    with trio.fail_after(5):
        async with pair({"announce": on_announce}) as (a, _):
            for seq in range(50):
                await a.send(Announce(index_id=1, after=seq, sequence=seq + 1))
            await all_seen.wait()
    assert seen == list(range(1, 51))


async def test_a_malformed_frame_closes_the_connection_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(5):
        async with raw_peer() as (conn, far):
            async with trio.open_nursery() as nursery:

                async def waiting_request() -> None:
                    with pytest.raises(PeerUnavailable, match="protocol error"):
                        await conn.request(ChunkGet(chunk_id=CHUNK))

                nursery.start_soon(waiting_request)
                await far.send_all(b"\x00\x00\x00\x02\x92\x01")  # a list, not a map
            await conn.wait_closed()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "protocol error" in warnings[0].getMessage()
    assert "rrrrrrrrrrrr (raw:1)" in warnings[0].getMessage()
    assert warnings[0].exc_info is None


async def test_a_peer_exceeding_the_in_flight_limit_is_cut_off() -> None:
    async def hang(peer: PeerConnection, msg: Message) -> Message:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    with trio.fail_after(5):
        async with raw_peer(handlers={"chunk_get": hang}) as (conn, far):
            frames = b"".join(
                encode_frame(ChunkGet(id=i, chunk_id=CHUNK)) for i in range(MAX_IN_FLIGHT + 1)
            )
            await far.send_all(frames)
            await conn.wait_closed()
            assert conn.close_reason is not None and "in flight" in conn.close_reason


async def test_a_silent_peer_is_declared_dead(autojump_clock: trio.abc.Clock) -> None:
    settings = ConnectionSettings(ping_interval=10, dead_after=60, request_timeout=30)
    with trio.fail_after(300):
        async with raw_peer(settings) as (conn, _far):
            # The far end never reads or answers: after 60 s of silence, closed.
            await conn.wait_closed()
            assert conn.close_reason == "no answer for 60 s"
            with pytest.raises(PeerUnavailable):
                await conn.request(Ping())


async def test_keepalive_measures_rtt_and_keeps_a_quiet_peer(
    autojump_clock: trio.abc.Clock,
) -> None:
    settings = ConnectionSettings(ping_interval=10, dead_after=30)
    with trio.fail_after(600):
        async with pair(settings=settings) as (a, b):
            with trio.move_on_after(300):  # virtual time: 30 keepalive rounds
                await a.wait_closed()  # must not happen: keepalives answer for the quiet peer
            assert not a.closed and not b.closed
            assert a.rtt_ms is not None and b.rtt_ms is not None


async def test_request_timeout_leaves_the_connection_usable(
    autojump_clock: trio.abc.Clock,
) -> None:
    release = trio.Event()

    async def slow(peer: PeerConnection, msg: Message) -> Message:
        await release.wait()
        return Missing(chunk_id=CHUNK)

    with trio.fail_after(120):
        async with pair({"chunk_get": slow}) as (a, _):
            with pytest.raises(PeerUnavailable, match="no reply to chunk_get within 5 s"):
                await a.request(ChunkGet(chunk_id=CHUNK), timeout=5)
            release.set()  # its late reply is dropped quietly
            assert isinstance(await a.request(Ping()), Pong)


async def test_aclose_is_idempotent_and_fails_later_calls() -> None:
    with trio.fail_after(5):
        async with pair() as (a, b):
            await a.aclose()
            await a.aclose()
            with pytest.raises(PeerUnavailable):
                await a.send(Ping())
            await b.wait_closed()  # the far end notices
            assert b.close_reason == "closed by the peer"


async def _read(stream: trio.abc.ReceiveStream, n: int, *, skip_pings: bool) -> list[Message]:
    decoder = FrameDecoder()
    out: list[Message] = []
    while len(out) < n:
        for msg in decode_frames(decoder, await stream.receive_some(65536)):
            if skip_pings and isinstance(msg, Ping):
                continue
            out.append(msg)
    return out
