"""Node-level membership: several nodes in one trio run over loopback TLS, no FUSE.

Every node listens on 127.0.0.1 port 0 with its own identity; all but the
intruders share one swarm key. Nothing sleeps to synchronise: tests wait on
membership conditions or on log records, each under a ``fail_after`` budget.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import trio
from ports import free_port

from swarmfs.crypto import certs
from swarmfs.crypto.keys import NodeIdentity, new_swarm_key
from swarmfs.errors import UserError
from swarmfs.net.peer import ConnectionSettings, PeerConnection
from swarmfs.net.wire import (
    UNKNOWN_TYPE,
    ChunkGet,
    Error,
    FrameDecoder,
    Hello,
    Message,
    Missing,
    decode_frames,
    encode_frame,
    parse_address,
)
from swarmfs.swarm.membership import (
    KnownPeer,
    Membership,
    MembershipSettings,
    MemoryPeerStore,
)

FAST = MembershipSettings(
    handshake_timeout=2.0,
    backoff_initial=0.05,
    backoff_max=0.5,
    pex_grace=2.0,
    connection=ConnectionSettings(request_timeout=5.0, ping_interval=0.5, dead_after=5.0),
)


class LogWatcher(logging.Handler):
    """Collects swarmfs log records and lets a test wait for a condition on them.

    Our code logs from trio tasks, so ``emit`` runs on the trio thread and may
    set a trio event.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._changed.set()
        self._changed = trio.Event()

    def warnings(self, containing: str = "") -> list[str]:
        return [
            r.getMessage()
            for r in self.records
            if r.levelno >= logging.WARNING and containing in r.getMessage()
        ]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()


@pytest.fixture
def logs() -> AsyncIterator[LogWatcher]:
    watcher = LogWatcher()
    logger = logging.getLogger("swarmfs")
    logger.addHandler(watcher)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    yield watcher
    logger.removeHandler(watcher)
    logger.setLevel(old_level)
    tracebacks = [r.getMessage() for r in watcher.records if r.exc_info]
    assert not tracebacks, f"unexpected tracebacks: {tracebacks}"


@dataclass
class Node:
    identity: NodeIdentity
    store: MemoryPeerStore
    membership: Membership
    address: str
    scope: trio.CancelScope

    @property
    def id(self) -> str:
        return self.identity.node_id

    def stop(self) -> None:
        self.scope.cancel()


class Swarm:
    """Starts nodes in one nursery; each node can be stopped on its own."""

    def __init__(self, nursery: trio.Nursery, tmp_path: Path, key: bytes) -> None:
        self.nursery = nursery
        self.tmp_path = tmp_path
        self.key = key

    async def start(
        self,
        *,
        bootstrap: Sequence[str] = (),
        identity: NodeIdentity | None = None,
        store: MemoryPeerStore | None = None,
        key: bytes | None = None,
        settings: MembershipSettings = FAST,
        listen: str = "127.0.0.1:0",
    ) -> Node:
        identity = identity or NodeIdentity.generate()
        store = store if store is not None else MemoryPeerStore()
        tls_dir = self.tmp_path / identity.node_id
        tls_dir.mkdir(exist_ok=True)
        membership = Membership(
            identity,
            key or self.key,
            listen=listen,
            bootstrap=bootstrap,
            store=store,
            tls_dir=tls_dir,
            settings=settings,
        )
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[str]) -> None:
            with scope:
                await membership.run(task_status=task_status)

        address = await self.nursery.start(run)
        return Node(identity, store, membership, address, scope)


@asynccontextmanager
async def swarm(tmp_path: Path) -> AsyncIterator[Swarm]:
    async with trio.open_nursery() as nursery:
        yield Swarm(nursery, tmp_path, new_swarm_key())
        nursery.cancel_scope.cancel()


def connected_ids(node: Node) -> set[str]:
    return {c.peer_id for c in node.membership.connected_peers()}


async def mesh(*nodes: Node) -> None:
    """Wait until every node is connected to every other."""
    for node in nodes:
        others = {n.id for n in nodes} - {node.id}
        await node.membership.wait_for(
            lambda node=node, others=others: others <= connected_ids(node)
        )


async def test_bootstrap_chain_becomes_a_full_mesh(tmp_path: Path, logs: LogWatcher) -> None:
    with trio.fail_after(10):
        async with swarm(tmp_path) as s:
            a = await s.start()
            b = await s.start(bootstrap=[a.address])
            c = await s.start(bootstrap=[b.address])
            await mesh(a, b, c)
            await c.membership.wait_connected(2)

            # Status: every peer listed with its listen address, connected, with an RTT.
            for conn in c.membership.connected_peers():
                await conn.ping()
            status = {p.id: p for p in c.membership.peers()}
            assert set(status) == {a.id, b.id}
            assert status[a.id].address == a.address
            assert status[a.id].connected
            assert status[a.id].last_seen is not None
            assert {p.node_id for p in await c.store.load()} == {a.id, b.id}

            # Requests reach registered handlers; an unserved type gets an error.
            async def chunk_get(peer: PeerConnection, msg: Message) -> Message:
                assert isinstance(msg, ChunkGet)
                return Missing(chunk_id=msg.chunk_id)

            a.membership.register_handler("chunk_get", chunk_get)
            to_a = c.membership.connection(a.id)
            to_b = c.membership.connection(b.id)
            assert to_a is not None and to_b is not None
            replies = await _in_parallel(
                [lambda i=i: to_a.request(ChunkGet(chunk_id=bytes([i]) * 32)) for i in range(20)]
            )
            assert replies == [
                Missing(id=r.id, chunk_id=bytes([i]) * 32) for i, r in enumerate(replies)
            ]
            reply = await to_b.request(ChunkGet(chunk_id=b"\0" * 32))
            assert isinstance(reply, Error) and reply.code == UNKNOWN_TYPE
    assert logs.warnings() == []


async def test_connect_hooks_run_per_connection(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with swarm(tmp_path) as s:
            a = await s.start()
            seen: list[str] = []
            got_one = trio.Event()

            async def hook(peer: PeerConnection) -> None:
                seen.append(peer.peer_id)
                got_one.set()

            a.membership.add_connect_hook(hook)
            b = await s.start(bootstrap=[a.address])
            await got_one.wait()
            assert seen == [b.id]


async def test_wrong_key_node_is_refused_and_logged_once(tmp_path: Path, logs: LogWatcher) -> None:
    with trio.fail_after(15):
        async with swarm(tmp_path) as s:
            a = await s.start()
            b = await s.start(bootstrap=[a.address])
            await mesh(a, b)
            intruder = await s.start(bootstrap=[a.address], key=new_swarm_key())

            # A refuses every attempt (one warning each); the intruder keeps retrying.
            await logs.wait_for(lambda: len(logs.warnings("different swarm key")) >= 4)
            dialler_side = logs.warnings(f"{a.address}: handshake failed")
            assert len(dialler_side) == 1, dialler_side
            assert "different swarm key" in dialler_side[0]
            assert intruder.membership.connected_peers() == []
            assert intruder.id not in {p.id for p in a.membership.peers()}

            # The members still serve each other.
            to_a = b.membership.connection(a.id)
            assert to_a is not None
            assert isinstance(await to_a.request(ChunkGet(chunk_id=b"\1" * 32)), Error)
    assert all("Traceback" not in w for w in logs.warnings())


async def test_restarted_node_reconnects_from_remembered_peers(tmp_path: Path) -> None:
    with trio.fail_after(15):
        async with swarm(tmp_path) as s:
            a = await s.start()
            b = await s.start(bootstrap=[a.address])
            c = await s.start(bootstrap=[b.address])
            await mesh(a, b, c)
            assert {p.node_id for p in await c.store.load()} == {a.id, b.id}

            c.stop()
            for node in (a, b):
                await node.membership.wait_for(lambda node=node: c.id not in connected_ids(node))
            assert not {p.id: p for p in a.membership.peers()}[c.id].connected

            again = await s.start(identity=c.identity, store=c.store)  # no bootstrap
            assert again.address != c.address  # a new port: peers must learn it
            await mesh(a, b, again)
            known = {p.id: p.address for p in a.membership.peers()}
            assert known[c.id] == again.address


async def test_redial_reaches_a_returning_peer_before_its_backoff(tmp_path: Path) -> None:
    """After a partition the backoff may be minutes away; a reader waiting on the peer
    calls ``redial`` and must not wait for it (the partition test lost a read this way)."""
    patient = replace(FAST, backoff_initial=600.0, backoff_max=600.0)
    listen = f"127.0.0.1:{free_port()}"
    with trio.fail_after(15):
        async with swarm(tmp_path) as s:
            b = await s.start(listen=listen)
            a = await s.start(bootstrap=[b.address], settings=patient)
            await mesh(a, b)
            b.stop()
            await a.membership.wait_for(lambda: b.id not in connected_ids(a))
            # b is back on its address but does not dial a; a's next try is up to 600 s away
            again = await s.start(identity=b.identity, listen=listen)
            assert again.id not in connected_ids(a)
            a.membership.redial([again.id])
            await mesh(a, again)


@pytest.mark.parametrize("attempt", range(3))
async def test_simultaneous_dials_leave_exactly_one_connection(
    tmp_path: Path, logs: LogWatcher, attempt: int
) -> None:
    with trio.fail_after(10):
        async with swarm(tmp_path) as s:
            a = await s.start()
            b = await s.start()
            a.membership.add_address(b.address)
            b.membership.add_address(a.address)
            smaller = min(a.id, b.id)

            def settled_on(node: Node, other: Node) -> bool:
                conn = node.membership.connection(other.id)
                return conn is not None and conn.outbound == (node.id == smaller)

            def settled() -> bool:
                return settled_on(a, b) and settled_on(b, a)

            # Each node's wait sees only its own changes: one predicate for both could
            # miss the other node settling last, and wait forever.
            await a.membership.wait_for(lambda: settled_on(a, b))
            await b.membership.wait_for(lambda: settled_on(b, a))
            assert len(a.membership.connected_peers()) == len(b.membership.connected_peers()) == 1
            ab = a.membership.connection(b.id)
            assert ab is not None
            assert isinstance(await ab.request(ChunkGet(chunk_id=b"\2" * 32)), Error)
            assert settled()
    assert logs.warnings() == []


async def test_port_in_use_is_a_one_line_user_error(tmp_path: Path) -> None:
    with trio.fail_after(5):
        async with swarm(tmp_path) as s:
            a = await s.start()
            taken = Membership(
                NodeIdentity.generate(),
                s.key,
                listen=a.address,
                store=MemoryPeerStore(),
                tls_dir=tmp_path,
            )
            with pytest.raises(UserError, match=f"^listen address {a.address} is already in use$"):
                await taken.run()


def test_malformed_addresses_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="bootstrap address"):
        Membership(
            NodeIdentity.generate(),
            new_swarm_key(),
            listen="127.0.0.1:0",
            bootstrap=["nowhere"],
            store=MemoryPeerStore(),
            tls_dir=tmp_path,
        )


# -- hostile input ------------------------------------------------------------


async def _drain_until_closed(stream: trio.abc.ReceiveStream) -> None:
    """Read until the node hangs up on us."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass


def _source(stream: trio.SocketStream) -> str:
    host, port = stream.socket.getsockname()[:2]
    return f"{host}:{port}"


async def _member_stream(
    s: Swarm, target: str, tmp_path: Path, identity: NodeIdentity | None = None
) -> tuple[trio.SSLStream[trio.SocketStream], str]:
    """A raw TLS connection holding a valid swarm certificate, under the test's control."""
    identity = identity or NodeIdentity.generate()
    ctx = certs.client_context(identity, s.key, tmp_path)
    host, port = parse_address(target)
    tcp = await trio.open_tcp_stream(host, port)
    tls = trio.SSLStream(tcp, ctx, server_hostname=None)
    await tls.do_handshake()
    return tls, _source(tcp)


async def test_hostile_input_closes_only_the_bad_connections(
    tmp_path: Path, logs: LogWatcher
) -> None:
    settings = MembershipSettings(
        handshake_timeout=1.0,
        max_handshaking=32,
        backoff_initial=0.05,
        backoff_max=0.5,
        connection=FAST.connection,
    )
    with trio.fail_after(20):
        async with swarm(tmp_path) as s:
            a = await s.start(settings=settings)
            b = await s.start(bootstrap=[a.address])
            await mesh(a, b)
            host, port = parse_address(a.address)
            bad_sources: list[str] = []

            # Random bytes instead of TLS.
            raw = await trio.open_tcp_stream(host, port)
            bad_sources.append(_source(raw))
            await raw.send_all(b"\x16\x03\x01\x00\x05" + os.urandom(4096))
            await _drain_until_closed(raw)

            # A real ClientHello, then garbage.
            raw = await trio.open_tcp_stream(host, port)
            bad_sources.append(_source(raw))
            await raw.send_all(_client_hello() + os.urandom(2048))
            await _drain_until_closed(raw)

            # Members' certificate, but a 4 GiB length prefix: before and after hello.
            tls, source = await _member_stream(s, a.address, tmp_path)
            bad_sources.append(source)
            await tls.send_all(b"\xff\xff\xff\xff")
            await _drain_until_closed(tls)

            tls, source = await _member_stream(s, a.address, tmp_path)
            bad_sources.append(source)
            await tls.send_all(encode_frame(Hello(listen="0.0.0.0:4567")))
            hello = await _read_one(tls)
            assert isinstance(hello, Hello) and hello.listen == a.address
            await tls.send_all(b"\xff\xff\xff\xff" + b"\0" * 64)
            await _drain_until_closed(tls)

            # 200 idle TCP connections: none may starve the real peers.
            idle = [await trio.open_tcp_stream(host, port) for _ in range(200)]
            bad_sources += [_source(t) for t in idle]
            to_a = b.membership.connection(a.id)
            assert to_a is not None
            assert isinstance(await to_a.request(ChunkGet(chunk_id=b"\3" * 32)), Error)
            async with trio.open_nursery() as nursery:
                for t in idle:
                    nursery.start_soon(_drain_until_closed, t)

            # Still serving, still the same peer connection, and new members get in.
            assert b.membership.connection(a.id) is to_a
            assert isinstance(await to_a.request(ChunkGet(chunk_id=b"\4" * 32)), Error)
            c = await s.start(bootstrap=[a.address])
            await mesh(a, b, c)

            for t in idle:
                await t.aclose()

    # One warning line per bad connection, naming it; nothing else warned.
    for source in bad_sources:
        assert len(logs.warnings(source)) == 1, (source, logs.warnings(source))
    assert len(logs.warnings()) == len(bad_sources)
    assert any("exceeds" in w for w in logs.warnings(bad_sources[2]))
    assert any("exceeds" in w for w in logs.warnings(bad_sources[3]))
    # The intruder's "0.0.0.0" listen host was replaced by where it came from.
    assert "127.0.0.1:4567" in {p.address for p in a.membership.peers()}


def _client_hello() -> bytes:
    """The first flight of a TLS 1.3 client, taken from an in-memory handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


async def _read_one(stream: trio.abc.ReceiveStream) -> Message:
    decoder = FrameDecoder()
    while True:
        for msg in decode_frames(decoder, await stream.receive_some(65536)):
            return msg


async def _in_parallel(calls: Sequence[Callable[[], object]]) -> list[Message]:
    results: list[Message | None] = [None] * len(calls)

    async def one(i: int) -> None:
        results[i] = await calls[i]()  # type: ignore[misc]

    async with trio.open_nursery() as nursery:
        for i in range(len(calls)):
            nursery.start_soon(one, i)
    return [r for r in results if r is not None]


def test_known_peer_is_a_plain_value() -> None:
    assert KnownPeer("x", "127.0.0.1:1") == KnownPeer("x", "127.0.0.1:1", None)
