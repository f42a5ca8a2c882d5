"""``net.tls.TLSStream``: swarm TLS 1.3 over loopback TCP, against trio's own TLS stream."""

from __future__ import annotations

import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from swarmfs.crypto import certs
from swarmfs.crypto.keys import NodeIdentity, new_swarm_key
from swarmfs.net.tls import RECEIVE_SIZE, TLSStream
from swarmfs.swarm.membership import _tls_failure

RECORD = 16 * 1024  # the largest TLS record's plaintext


@asynccontextmanager
async def _tcp_pair() -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        accepted: list[trio.SocketStream] = []

        async def accept() -> None:
            accepted.append(await listeners[0].accept())

        nursery.start_soon(accept)
        dialled = await trio.open_tcp_stream("127.0.0.1", port)
    await listeners[0].aclose()
    try:
        yield accepted[0], dialled
    finally:
        await trio.aclose_forcefully(accepted[0])
        await trio.aclose_forcefully(dialled)


@asynccontextmanager
async def _connected(
    tmp_path: Path, client_key: bytes | None = None
) -> AsyncIterator[tuple[TLSStream, TLSStream]]:
    """A server and a client ``TLSStream`` after their handshake."""
    key = new_swarm_key()
    server_ctx = certs.server_context(NodeIdentity.generate(), key, tmp_path)
    client_ctx = certs.client_context(NodeIdentity.generate(), client_key or key, tmp_path)
    async with _tcp_pair() as (left, right):
        server = TLSStream(left, server_ctx, server_side=True)
        client = TLSStream(right, client_ctx, server_side=False)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.do_handshake)
                nursery.start_soon(client.do_handshake)
        yield server, client


async def _receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> list[bytes]:
    pieces: list[bytes] = []
    while sum(map(len, pieces)) < size:
        piece = await stream.receive_some()
        assert piece, "closed early"
        pieces.append(piece)
    return pieces


async def test_one_receive_returns_every_record_that_arrived_not_one_record(
    tmp_path: Path,
) -> None:
    """The point of the module: a 1 MiB chunk in a few receives, not 64."""
    data = os.urandom(1 << 20)
    async with _connected(tmp_path) as (server, client):
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, data)
                pieces = await _receive_exactly(server, len(data))
    assert b"".join(pieces) == data
    assert max(map(len, pieces)) > 4 * RECORD
    assert max(map(len, pieces)) <= RECEIVE_SIZE


async def test_both_directions_at_once_with_trio_s_tls_on_the_other_end(tmp_path: Path) -> None:
    """Interoperates with ``trio.SSLStream`` (what tests' hostile peers use) while both
    sides send and receive at the same time, in pieces of every size."""
    key = new_swarm_key()
    server_ctx = certs.server_context(NodeIdentity.generate(), key, tmp_path)
    client_ctx = certs.client_context(NodeIdentity.generate(), key, tmp_path)
    sizes = [1, 100, RECORD - 1, RECORD, RECORD + 1, 70_000, 1 << 20, 3]
    outbound = [os.urandom(n) for n in sizes]
    inbound = [os.urandom(n) for n in reversed(sizes)]
    async with _tcp_pair() as (left, right):
        ours = TLSStream(left, server_ctx, server_side=True)
        theirs = trio.SSLStream(right, client_ctx, server_hostname=None)
        received: dict[str, bytes] = {}

        async def send(stream: trio.abc.SendStream, pieces: list[bytes]) -> None:
            for piece in pieces:
                await stream.send_all(piece)

        async def receive(name: str, stream: trio.abc.ReceiveStream, size: int) -> None:
            received[name] = b"".join(await _receive_exactly(stream, size))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ours.do_handshake)
                nursery.start_soon(theirs.do_handshake)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, ours, outbound)
                nursery.start_soon(send, theirs, inbound)
                nursery.start_soon(receive, "ours", ours, sum(sizes))
                nursery.start_soon(receive, "theirs", theirs, sum(sizes))
    assert received["theirs"] == b"".join(outbound)
    assert received["ours"] == b"".join(inbound)


async def test_a_clean_close_reads_as_end_of_stream(tmp_path: Path) -> None:
    async with _connected(tmp_path) as (server, client):
        with trio.fail_after(5):
            await client.send_all(b"last words")
            await client.aclose()
            assert b"".join(await _receive_exactly(server, 10)) == b"last words"
            assert await server.receive_some() == b""
            assert await server.receive_some() == b""


async def test_a_connection_cut_without_close_notify_is_broken_with_the_tls_reason(
    tmp_path: Path,
) -> None:
    async with _connected(tmp_path) as (server, client):
        await client.transport.aclose()  # the TCP connection ends, TLS never said goodbye
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as caught:
            await server.receive_some()
        with pytest.raises(trio.BrokenResourceError) as again:  # later calls say why too
            await server.send_all(b"x")
    for error in (caught.value, again.value):
        assert isinstance(error.__cause__, ssl.SSLError)
        assert "EOF" in str(error.__cause__)


async def test_another_swarm_s_certificate_is_refused_with_a_reason_on_both_sides(
    tmp_path: Path,
) -> None:
    """The refusing side sends its alert, so the refused side can say why."""
    key = new_swarm_key()
    server_ctx = certs.server_context(NodeIdentity.generate(), key, tmp_path)
    stranger_ctx = certs.client_context(NodeIdentity.generate(), new_swarm_key(), tmp_path)
    failures: dict[str, BaseException] = {}
    async with _tcp_pair() as (left, right):
        server = TLSStream(left, server_ctx, server_side=True)
        stranger = TLSStream(right, stranger_ctx, server_side=False)

        async def handshake(name: str, stream: TLSStream) -> None:
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                failures[name] = exc

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(handshake, "server", server)
                nursery.start_soon(handshake, "stranger", stranger)
    assert isinstance(failures["stranger"].__cause__, ssl.SSLCertVerificationError)
    server_reason = failures["server"].__cause__
    assert isinstance(server_reason, ssl.SSLError)
    assert "ALERT" in (server_reason.reason or ""), server_reason  # not a bare hang-up


async def test_two_tasks_receiving_at_once_is_an_error_not_a_garbled_stream(
    tmp_path: Path,
) -> None:
    async with _connected(tmp_path) as (server, _client):
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.receive_some)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    await server.receive_some()
                nursery.cancel_scope.cancel()


async def test_a_peer_resetting_the_handshake_is_a_hang_up_not_a_tls_error(
    tmp_path: Path,
) -> None:
    """Regression test: the socket error was raised while the handshake's "want more
    data" was being handled, so it carried that TLS condition as its context, and the
    node logged "not a swarmfs TLS 1.3 peer: The operation did not complete"."""
    server_ctx = certs.server_context(NodeIdentity.generate(), new_swarm_key(), tmp_path)
    async with _tcp_pair() as (left, right):
        server = TLSStream(left, server_ctx, server_side=True)
        right.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await right.aclose()  # a reset, as a relay dropping the link sends
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as caught:
            await server.do_handshake()
    assert _tls_failure(caught.value) == "it hung up during the handshake"
