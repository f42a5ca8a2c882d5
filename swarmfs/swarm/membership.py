"""Who is in the swarm and connected: listening, dialling, authenticating, peer exchange.

``Membership`` keeps one authenticated ``PeerConnection`` per remote node:

- It listens on the configured address and dials bootstrap addresses, the
  peers remembered in its ``PeerStore`` and the addresses peers tell it about
  in their ``hello`` (peer exchange: a node bootstrapped from B meets A too).
- Every connection runs a TLS 1.3 handshake with mutual authentication under a
  deadline; the peer's node id comes from its certificate. Then both sides
  exchange ``hello`` (protocol version, listen address, known peer addresses,
  index position). At most ``max_handshaking`` inbound connections may be in
  this unauthenticated phase at once; more are refused at once, so idle or
  hostile sockets cannot pile up.
- Exactly one connection per pair of nodes: when two exist (simultaneous
  dials, a second address), both ends keep the one dialled by the smaller node
  id (then the smaller dialling port), so they agree without talking. To
  avoid the duplicate in the first place, of two nodes that learn of each
  other from a third, the smaller id dials at once and the larger waits
  ``pex_grace`` (the ids in a ``hello``'s peer list are hints, checked by TLS).
- A lost peer is redialled with exponential backoff and jitter; ``redial``
  cuts the wait short when a reader needs a peer now (after a partition heals,
  the backoff may be a minute away).

Logging: a failed inbound handshake is one warning line per connection; a
failed dial is one line per address and reason (info when unreachable,
warning when the handshake fails, e.g. a different swarm key), repeated only
at debug level until the address works again. No tracebacks for anything a
peer can cause.

Concurrency: one trio task per connection, one dial loop, one advertiser; all
state lives on the trio loop and is read by the other services there.
"""

from __future__ import annotations

import errno
import logging
import math
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from swarmfs.crypto.certs import client_context, peer_node_id, server_context
from swarmfs.crypto.keys import NodeIdentity
from swarmfs.errors import ProtocolError, UserError
from swarmfs.net.peer import ConnectionSettings, Handler, PeerConnection, PeerUnavailable
from swarmfs.net.tls import TLSStream
from swarmfs.net.wire import (
    MAX_PEERS_IN_HELLO,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Hello,
    Message,
    Reply,
    format_address,
    is_unspecified,
    parse_address,
)

log = logging.getLogger(__name__)

ConnectHook = Callable[[PeerConnection], Awaitable[None]]
"""Runs when a peer becomes connected; cancelled when that connection closes."""

IndexPosition = Callable[[], tuple[int, int]]
"""``(index id, sequence)`` to advertise in ``hello``; opaque to membership."""


@dataclass(frozen=True)
class KnownPeer:
    """A node this one has been connected to, and where it last listened."""

    node_id: str
    address: str
    last_seen: float | None = None
    """Unix seconds."""


class PeerStore(Protocol):
    """Where known peers persist across restarts (SQLite in ``meta/``; memory in tests).

    ``save`` is awaited on the event loop, so an implementation hands the
    write to its writer thread instead of blocking.
    """

    async def load(self) -> list[KnownPeer]: ...

    async def save(self, peer: KnownPeer) -> None:
        """Insert or replace the entry for ``peer.node_id``."""


class MemoryPeerStore:
    """A ``PeerStore`` that forgets on exit: for tests and throwaway nodes."""

    def __init__(self, peers: Iterable[KnownPeer] = ()) -> None:
        self.peers = {p.node_id: p for p in peers}

    async def load(self) -> list[KnownPeer]:
        return list(self.peers.values())

    async def save(self, peer: KnownPeer) -> None:
        self.peers[peer.node_id] = peer


@dataclass(frozen=True)
class PeerStatus:
    """One line of ``swarmfs status``."""

    id: str
    address: str | None
    connected: bool
    last_seen: float | None
    rtt_ms: float | None

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "address": self.address,
            "connected": self.connected,
            "last_seen": self.last_seen,
            "rtt_ms": self.rtt_ms,
        }


@dataclass(frozen=True)
class MembershipSettings:
    """Limits and timeouts, in seconds; tests shorten them."""

    handshake_timeout: float = 10.0
    """TCP connect, TLS handshake and hello exchange together."""
    max_handshaking: int = 64
    max_dialling: int = 16
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    max_addresses: int = 1024
    """Addresses remembered from bootstrap, peer exchange and known peers."""
    pex_attempts: int = 5
    """Failed dials after which an address learnt only from a peer is forgotten."""
    pex_grace: float = 5.0
    """How long the larger node id waits for the smaller to dial a peer both just learnt of."""
    connection: ConnectionSettings = field(default_factory=ConnectionSettings)


@dataclass(eq=False)
class _Target:
    """An address worth dialling, and how dialling it has gone."""

    address: str
    node_id: str | None = None
    bootstrap: bool = False
    known: bool = False
    """Where a node we have been connected to listens (kept however long it is away)."""
    failures: int = 0
    next_try: float = -math.inf
    hurried_at: float = -math.inf
    """When ``redial`` last moved ``next_try`` forward."""
    in_flight: bool = False
    is_self: bool = False
    last_error: str | None = None


class _HandshakeFailed(Exception):
    """Internal: why one connection never became a peer, and how loudly to say so."""

    def __init__(self, reason: str, level: int = logging.WARNING) -> None:
        super().__init__(reason)
        self.level = level


_RESERVED_TYPES = {"hello", "ping"}


class Membership:
    """Keeps this node connected to the swarm; see the module docstring."""

    def __init__(
        self,
        identity: NodeIdentity,
        swarm_key: bytes,
        *,
        listen: str,
        store: PeerStore,
        tls_dir: Path,
        bootstrap: Sequence[str] = (),
        index_position: IndexPosition | None = None,
        settings: MembershipSettings | None = None,
    ) -> None:
        self.node_id = identity.node_id
        self.listen_address: str | None = None
        """The bound ``host:port`` once ``run`` has started (port 0 resolved)."""
        self._listen = _checked_address(listen, "listen address", allow_port_zero=True)
        self._bootstrap = [
            format_address(*_checked_address(a, "bootstrap address")) for a in bootstrap
        ]
        self._store = store
        # Built once: each needs the node key on disk for a moment (see crypto.certs).
        self._server_ctx = server_context(identity, swarm_key, tls_dir)
        self._client_ctx = client_context(identity, swarm_key, tls_dir)
        self._index_position = index_position or (lambda: (0, 0))
        self._settings = settings or MembershipSettings()
        self._handlers: dict[str, Handler] = {"hello": self._on_hello}
        self._connect_hooks: list[ConnectHook] = []
        self._known: dict[str, KnownPeer] = {}
        self._targets: dict[str, _Target] = {}
        self._connections: dict[str, PeerConnection] = {}
        self._link_keys: dict[PeerConnection, tuple[str, int]] = {}
        self._handshaking = 0
        self._dial_limit = trio.CapacityLimiter(self._settings.max_dialling)
        self._wake_dialler = trio.Event()
        self._wake_advertiser = trio.Event()
        self._changed = trio.Event()
        self._random = random.Random()

    # -- public API ---------------------------------------------------------

    def register_handler(self, msg_type: str, handler: Handler) -> None:
        """Serve requests or pushes of ``msg_type`` on every connection, present and future."""
        cls = MESSAGE_TYPES.get(msg_type)
        if cls is None or issubclass(cls, Reply) or msg_type in _RESERVED_TYPES:
            raise ValueError(f"cannot register a handler for {msg_type!r}")
        self._handlers[msg_type] = handler

    def add_connect_hook(self, hook: ConnectHook) -> None:
        """Run ``hook(peer)`` each time a peer becomes connected (index sync starts here)."""
        self._connect_hooks.append(hook)

    def add_address(self, address: str) -> None:
        """Dial ``address`` (as if given with ``--bootstrap``) until it answers."""
        self._add_target(format_address(*_checked_address(address, "address")), bootstrap=True)

    def redial(self, node_ids: Iterable[str]) -> None:
        """Dial these known, unconnected peers now instead of at their backoff time.

        A reader waiting for a chunk only they hold calls this. A peer is
        hurried at most once per ``backoff_initial`` so waiting readers cannot
        turn into a dial storm, and not while a dial to it is in flight.
        """
        wanted = set(node_ids)
        now = trio.current_time()
        for target in self._targets.values():
            if target.node_id not in wanted or target.in_flight or target.next_try <= now:
                continue
            if (
                self.connection(target.node_id)
                or now - target.hurried_at < self._settings.backoff_initial
            ):
                continue
            target.hurried_at = now
            target.next_try = now
            self._wake_dialler.set()

    def connected_peers(self) -> list[PeerConnection]:
        return [c for c in self._connections.values() if not c.closed]

    def connection(self, node_id: str) -> PeerConnection | None:
        conn = self._connections.get(node_id)
        return None if conn is None or conn.closed else conn

    def peers(self) -> list[PeerStatus]:
        """Known and connected peers, for ``status``."""
        now = time.time()
        out = []
        for node_id in sorted(self._known.keys() | self._connections.keys()):
            conn = self.connection(node_id)
            known = self._known.get(node_id)
            out.append(
                PeerStatus(
                    id=node_id,
                    address=known.address if known else None,
                    connected=conn is not None,
                    last_seen=now if conn else (known.last_seen if known else None),
                    rtt_ms=conn.rtt_ms if conn else None,
                )
            )
        return out

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; it is re-checked whenever peers change."""
        while not predicate():
            await self._changed.wait()

    async def wait_connected(self, n: int) -> None:
        await self.wait_for(lambda: len(self.connected_peers()) >= n)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, then keep the swarm connected until cancelled.

        ``task_status.started`` reports the bound ``host:port``. A listen
        address that cannot be bound raises ``UserError`` before that.
        """
        listeners = await self._open_listeners()
        for peer in await self._store.load():
            self._known[peer.node_id] = peer
            self._add_target(peer.address, node_id=peer.node_id, known=True)
        for address in self._bootstrap:
            self._add_target(address, bootstrap=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._accept, listeners)
            nursery.start_soon(self._dial_loop, nursery)
            nursery.start_soon(self._advertise_loop)
            log.info("node %s listening on %s", self.node_id, self.listen_address)
            task_status.started(self.listen_address)

    # -- listening and accepting --------------------------------------------

    async def _open_listeners(self) -> list[trio.SocketListener]:
        host, port = self._listen
        shown = format_address(host, port)
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"listen address {shown} is already in use") from None
            raise UserError(f"cannot listen on {shown}: {exc.strerror or exc}") from None
        bound = listeners[0].socket.getsockname()
        self.listen_address = format_address(bound[0], bound[1])
        return listeners

    async def _accept(self, tcp: trio.SocketStream) -> None:
        try:
            host, port = tcp.socket.getpeername()[:2]
        except OSError:  # already reset by the other side
            await trio.aclose_forcefully(tcp)
            return
        address = format_address(host, port)
        if self._handshaking >= self._settings.max_handshaking:
            log.warning(
                "refusing connection from %s: %d connections are already handshaking",
                address,
                self._handshaking,
            )
            await trio.aclose_forcefully(tcp)
            return
        self._handshaking += 1
        try:
            conn = await self._authenticate(tcp, address, dialler_port=port)
        except _HandshakeFailed as exc:
            log.log(exc.level, "handshake with %s failed: %s", address, exc)
            return
        finally:
            self._handshaking -= 1
        if conn is not None:
            await self._serve(conn)

    # -- dialling -----------------------------------------------------------

    def _add_target(
        self,
        address: str,
        *,
        node_id: str | None = None,
        bootstrap: bool = False,
        known: bool = False,
    ) -> None:
        """Dial ``address`` from now on; ``node_id`` is verified if ``known``, else a hint."""
        if address == self.listen_address:
            return
        target = self._targets.get(address)
        if target is None:
            from_peer = not (bootstrap or known)
            if from_peer and len(self._targets) >= self._settings.max_addresses:
                return
            target = self._targets[address] = _Target(address)
            if from_peer and node_id is not None and node_id > self.node_id:
                # Both ends keep the link the smaller id dialled, so let it dial
                # first; this side steps in only if that has not happened soon.
                target.next_try = trio.current_time() + self._settings.pex_grace
        target.bootstrap |= bootstrap
        target.known |= known
        if node_id is not None and (known or target.node_id is None):
            target.node_id = node_id
        self._wake_dialler.set()

    async def _dial_loop(self, nursery: trio.Nursery) -> None:
        """Start a dial for every due address whose node is not connected; sleep until the next."""
        while True:
            self._wake_dialler = trio.Event()
            now = trio.current_time()
            wake_at = math.inf
            for target in list(self._targets.values()):
                if target.in_flight or target.is_self:
                    continue
                if target.node_id is not None and self.connection(target.node_id):
                    continue
                if target.next_try <= now:
                    target.in_flight = True
                    nursery.start_soon(self._dial, target)
                else:
                    wake_at = min(wake_at, target.next_try)
            with trio.move_on_at(wake_at):
                await self._wake_dialler.wait()

    async def _dial(self, target: _Target) -> None:
        try:
            async with self._dial_limit:
                conn = await self._connect(target)
            if conn is None:
                return
            target.failures = 0
            target.last_error = None
            target.node_id = conn.peer_id
            await self._serve(conn)
            # Redial soon if the connection drops (the peer may be restarting).
            target.next_try = trio.current_time() + self._jitter(self._settings.backoff_initial)
        finally:
            target.in_flight = False
            self._wake_dialler.set()

    async def _connect(self, target: _Target) -> PeerConnection | None:
        host, port = parse_address(target.address)
        try:
            with trio.fail_after(self._settings.handshake_timeout):
                tcp = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            self._dial_failed(target, "no answer", logging.INFO)
            return None
        except OSError as exc:
            self._dial_failed(target, f"cannot connect: {exc.strerror or exc}", logging.INFO)
            return None
        try:
            return await self._authenticate(tcp, target.address, target=target)
        except _HandshakeFailed as exc:
            self._dial_failed(target, f"handshake failed: {exc}", exc.level)
            return None

    def _dial_failed(self, target: _Target, reason: str, level: int) -> None:
        if reason != target.last_error:
            log.log(level, "%s: %s (will keep trying)", target.address, reason)
        else:
            log.debug("%s: %s (again)", target.address, reason)
        target.last_error = reason
        target.failures += 1
        learnt_from_peer = not (target.bootstrap or target.known)
        if learnt_from_peer and target.failures >= self._settings.pex_attempts:
            self._forget_target(target)
            return
        delay = min(
            self._settings.backoff_max,
            self._settings.backoff_initial * 2 ** (target.failures - 1),
        )
        target.next_try = trio.current_time() + delay / 2 + self._jitter(delay / 2)

    def _forget_target(self, target: _Target) -> None:
        if self._targets.get(target.address) is target:
            del self._targets[target.address]

    def _jitter(self, upto: float) -> float:
        return self._random.uniform(0, upto)

    # -- authentication -----------------------------------------------------

    async def _authenticate(
        self,
        tcp: trio.SocketStream,
        address: str,
        *,
        target: _Target | None = None,
        dialler_port: int | None = None,
    ) -> PeerConnection | None:
        """TLS handshake and hello under one deadline; ``None`` if it was ourselves.

        Outbound when dialling ``target``; inbound otherwise, from ``dialler_port``.
        """
        outbound = target is not None
        if dialler_port is None:
            dialler_port = tcp.socket.getsockname()[1]
        tls = TLSStream(
            tcp, self._client_ctx if outbound else self._server_ctx, server_side=not outbound
        )
        conn: PeerConnection | None = None
        try:
            with trio.fail_after(self._settings.handshake_timeout):
                await tls.do_handshake()
                peer_id = peer_node_id(tls)
                if peer_id == self.node_id:
                    if target is not None:
                        target.is_self = True
                    await trio.aclose_forcefully(tls)
                    return None
                conn = PeerConnection(
                    tls,
                    peer_id=peer_id,
                    address=address,
                    outbound=outbound,
                    handlers=self._handlers,
                    settings=self._settings.connection,
                )
                hello = await conn.exchange_hello(self._hello())
        except trio.TooSlowError:
            reason = f"timed out after {self._settings.handshake_timeout:g} s"
        except trio.BrokenResourceError as exc:
            reason = _tls_failure(exc)
        except PeerUnavailable as exc:
            if conn is not None and _ssl_error(exc) is None:
                # An authenticated member hung up, e.g. dropping the duplicate of
                # a simultaneous dial: nothing is wrong.
                await conn.aclose()
                raise _HandshakeFailed(f"closed before its hello: {exc}", logging.INFO) from None
            reason = _tls_failure(exc)
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
        else:
            if hello.version == PROTOCOL_VERSION:
                # The dialler's (node id, port) names the link identically on both ends.
                dialler = self.node_id if outbound else conn.peer_id
                self._link_keys[conn] = (dialler, dialler_port)
                return conn
            reason = f"speaks protocol version {hello.version}, this node {PROTOCOL_VERSION}"
        if conn is not None:
            await conn.aclose()
        else:
            await trio.aclose_forcefully(tls)
        raise _HandshakeFailed(reason)

    def _hello(self) -> Hello:
        index_id, sequence = self._index_position()
        return Hello(
            listen=self.listen_address,
            peers=self._shareable_peers(),
            index_id=index_id,
            sequence=sequence,
        )

    def _shareable_peers(self) -> tuple[tuple[str, str], ...]:
        """Where known peers listen, connected ones and the most recently seen first."""
        ranked = sorted(
            self._known.values(),
            key=lambda p: (self.connection(p.node_id) is None, -(p.last_seen or 0.0)),
        )
        return tuple((p.node_id, p.address) for p in ranked[:MAX_PEERS_IN_HELLO])

    # -- connected peers ----------------------------------------------------

    async def _serve(self, conn: PeerConnection) -> None:
        """Own one authenticated connection from registration until it closes."""
        if not await self._register(conn):
            return
        try:
            await self._learn_from_hello(conn)
            async with trio.open_nursery() as nursery:
                for hook in self._connect_hooks:
                    nursery.start_soon(self._run_hook, hook, conn)
                await conn.run()
                nursery.cancel_scope.cancel()
        finally:
            self._link_keys.pop(conn, None)
            if self._connections.get(conn.peer_id) is conn:
                del self._connections[conn.peer_id]
                known = self._known.get(conn.peer_id)
                if known is not None:
                    # Recorded even while shutting down, but never holding shutdown up.
                    with trio.move_on_after(2) as scope:
                        scope.shield = True
                        await self._save(KnownPeer(conn.peer_id, known.address, time.time()))
                self._wake_dialler.set()
            self._notify()

    async def _register(self, conn: PeerConnection) -> bool:
        """Make ``conn`` the node's connection unless a preferred one already exists."""
        existing = self.connection(conn.peer_id)
        if existing is not None:
            keep, drop = sorted((existing, conn), key=lambda c: self._link_keys[c])
            log.debug(
                "%s: two connections, keeping the one dialled by %s", conn, self._link_keys[keep]
            )
            self._connections[conn.peer_id] = keep
            await drop.aclose()
            if keep is existing:
                return False
        else:
            self._connections[conn.peer_id] = conn
        log.info("connected to %s (%s)", conn, "dialled" if conn.outbound else "accepted")
        self._wake_advertiser.set()
        self._notify()
        return True

    async def _run_hook(self, hook: ConnectHook, conn: PeerConnection) -> None:
        try:
            await hook(conn)
        except PeerUnavailable as exc:
            log.debug("connect hook for %s stopped: %s", conn, exc)
        except Exception:
            log.exception("connect hook for %s failed", conn)

    async def _on_hello(self, conn: PeerConnection, msg: Message) -> None:
        """A peer re-sent its hello: new listen address or newly known peers."""
        await self._learn_from_hello(conn)

    async def _learn_from_hello(self, conn: PeerConnection) -> None:
        hello = conn.remote_hello
        assert hello is not None
        if conn.outbound:
            address: str | None = conn.address
        elif hello.listen is not None:
            host, port = parse_address(hello.listen)
            if is_unspecified(host):  # "listening everywhere": reachable where it came from
                host = parse_address(conn.address)[0]
            address = format_address(host, port)
        else:
            address = None
        if address is not None:
            await self._remember(conn.peer_id, address)
        for node_id, peer_address in hello.peers:
            host, _ = parse_address(peer_address)
            if node_id != self.node_id and not is_unspecified(host):
                self._add_target(peer_address, node_id=node_id)

    async def _remember(self, node_id: str, address: str) -> None:
        """Record where ``node_id`` listens; its old address is no longer dialled."""
        old = self._known.get(node_id)
        if old is not None and old.address != address:
            stale = self._targets.get(old.address)
            if stale is not None and stale.node_id == node_id and not stale.bootstrap:
                self._forget_target(stale)
        self._known[node_id] = KnownPeer(node_id, address, time.time())
        self._add_target(address, node_id=node_id, known=True)
        await self._save(self._known[node_id])

    async def _save(self, peer: KnownPeer) -> None:
        self._known[peer.node_id] = peer
        await self._store.save(peer)

    async def _advertise_loop(self) -> None:
        """Re-send hello to every peer when the set of peers grows, so news spreads."""
        while True:
            await self._wake_advertiser.wait()
            self._wake_advertiser = trio.Event()
            hello = self._hello()
            async with trio.open_nursery() as nursery:
                for conn in self.connected_peers():
                    nursery.start_soon(self._send_quietly, conn, hello)

    @staticmethod
    async def _send_quietly(conn: PeerConnection, msg: Message) -> None:
        try:
            await conn.send(msg)
        except PeerUnavailable as exc:
            log.debug("could not update %s: %s", conn, exc)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


def _checked_address(text: str, what: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    try:
        return parse_address(text, allow_port_zero=allow_port_zero)
    except ValueError as exc:
        raise UserError(f"{what}: {exc}") from None


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a trio stream error, if there is one."""
    inner: BaseException | None = exc
    while inner is not None and not isinstance(inner, ssl.SSLError):
        inner = inner.__cause__ or inner.__context__
    return inner


def _tls_failure(exc: BaseException) -> str:
    """A one-line reason for a failed handshake, naming the likely cause."""
    inner = _ssl_error(exc)
    if isinstance(inner, ssl.SSLCertVerificationError):
        why = inner.verify_message
        return f"its certificate is not from this swarm (a different swarm key?): {why}"
    if isinstance(inner, ssl.SSLError):
        reason = inner.reason or str(inner)
        if reason in _REFUSED_OUR_CERT:
            return f"it refused our certificate (a different swarm key?): {reason}"
        if reason == "UNEXPECTED_EOF_WHILE_READING":
            # What a node that rejects our certificate does (no alert is sent).
            return "it hung up during the TLS handshake (a different swarm key?)"
        return f"not a swarmfs TLS 1.3 peer: {reason}"
    return "it hung up during the handshake"


_REFUSED_OUR_CERT = {
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "TLSV1_ALERT_DECRYPT_ERROR",
}
