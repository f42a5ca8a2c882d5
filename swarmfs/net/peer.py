"""One authenticated connection to a peer: requests, replies, pushes, keepalive.

The stream below is already authenticated (``swarm.membership`` runs the TLS
handshake and knows the peer's node id); this module only moves messages. One
reader task decodes frames and routes them: a reply wakes the request waiting
for its ``id``; a request runs its handler in a task of its own, whose answer
is sent back with the same ``id``; a push runs its handler on the reader task,
so pushes are handled in the order they were sent.

Deadlock freedom: the reader never waits to send. Each side keeps at most
``MAX_IN_FLIGHT`` requests outstanding, and a peer that sends more breaks the
protocol, so a handler slot is always free when a request arrives and both
readers keep draining even when both sides are pushing chunks at once.

A frame is encoded and written whole under the send lock, shielded from the
caller's cancellation (a half-written frame would corrupt the stream), but
bounded by ``dead_after``; encoding under the lock keeps one encoded copy per
connection, not one per waiting sender.

Memory (``swarmfs.memory``): when a frame header announces a body of
``RESERVE_FROM`` bytes or more, the reader takes that many bytes of the
node's ``receive`` pool before it reads on, so a peer pushing faster than
this node stores waits in TCP, not in this process. A request keeps its bytes
until its handler returns (before its reply is sent: a handler's bytes are
freed by local work alone, never by the network); a reply frees them when it
reaches the request that waits for it. A request whose reply may carry a chunk
(``LARGE_REPLY``) takes ``MAX_FRAME`` bytes of the ``send`` pool before its
handler runs, until the reply is written; at most ``LARGE_REPLIES`` per
connection, so a peer that does not read its replies cannot take the whole pool.

Silence alone cannot free a reservation, since every byte resets it: a peer
could announce a chunk-sized frame and trickle one byte a minute. So once its
bytes are reserved, the rest of a frame's body must arrive within
``max(frame_timeout, size / frame_min_rate)`` seconds, or the connection is
closed (one warning line) and the bytes are freed. The clock starts once the
bytes are reserved (waiting for the pool is not the peer's fault), and the
floor equals the sender's own limit for writing one frame (``dead_after``),
so a sender gets at least the time it gives itself; the rate term (16 KiB/s,
a 68 s bound for a ``MAX_FRAME``) leaves headroom for the tail of a large
frame still in the sender's kernel buffers.

A protocol violation closes this connection and is logged once as one warning
line; losing a connection is logged at info; neither is a traceback. A handler
that raises an unexpected exception is a bug: it is logged with its traceback
and answered with an ``internal`` error.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace

import trio

from swarmfs.errors import ProtocolError, SwarmfsError
from swarmfs.memory import Pool
from swarmfs.net.wire import (
    INTERNAL,
    MAX_FRAME,
    UNKNOWN_TYPE,
    Error,
    FrameDecoder,
    Hello,
    Message,
    Ping,
    Pong,
    Reply,
    Request,
    UnknownRequest,
    decode_message,
    encode_frame_parts,
)

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 32
"""Requests one side may have outstanding on a connection (a protocol constant)."""

LARGE_REPLIES = 4
"""Chunk replies one connection may hold in the node's ``send`` pool at once: a peer
that asks for chunks and reads none of the replies holds back these, not every
other peer's (the pool serves its waiters in order)."""

_RECEIVE_SIZE = 256 * 1024
RESERVE_FROM = 64 * 1024
"""Frame bodies at least this large are reserved in the ``receive`` pool before they are read."""
_SPLIT_FROM = 64 * 1024  # bodies this large are written after their header, not joined to it
_DEFAULT_POOL = 8 * 1024 * 1024  # a connection's own pools when the node gives none (tests)

Handler = Callable[["PeerConnection", Message], Awaitable[Message | None]]
"""``async fn(peer, msg)``: a reply for a request, ``None`` for a push."""


class PeerUnavailable(SwarmfsError):
    """The connection closed, or the peer did not answer in time."""


@dataclass(frozen=True)
class ConnectionSettings:
    """Timeouts in seconds; tests shorten them."""

    request_timeout: float = 30.0
    ping_interval: float = 15.0
    dead_after: float = 60.0
    """Close when nothing arrived for this long, or a frame took this long to send."""
    frame_timeout: float = 60.0
    """Least time the rest of a reserved (large) frame's body gets to arrive."""
    frame_min_rate: float = 16 * 1024
    """Bytes per second below which a reserved frame's body is too slow (see ``frame_time``)."""
    receive_pool: Pool | None = None
    """The node's ``receive`` pool; ``None``: the connection gets one of its own."""
    send_pool: Pool | None = None
    """The node's ``send`` pool; ``None``: the connection gets one of its own."""

    def frame_time(self, size: int) -> float:
        """Seconds the body of a reserved frame of ``size`` bytes gets to arrive."""
        return max(self.frame_timeout, size / self.frame_min_rate)


@dataclass
class _Pending:
    event: trio.Event
    reply: Message | None = None


class PeerConnection:
    """Messages over one stream to the node ``peer_id`` (taken from its certificate)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        peer_id: str,
        address: str,
        outbound: bool,
        handlers: Mapping[str, Handler],
        settings: ConnectionSettings | None = None,
    ) -> None:
        self.peer_id = peer_id
        self.address = address
        """Where the connection goes (outbound) or comes from (inbound), ``host:port``."""
        self.outbound = outbound
        self.remote_hello: Hello | None = None
        """The peer's latest ``hello``."""
        self.first_hello: Hello | None = None
        """The ``hello`` this node sent first: the peer's first pull starts after it."""
        self.rtt_ms: float | None = None
        self.close_reason: str | None = None
        self._stream = stream
        self._handlers = handlers
        self._settings = settings or ConnectionSettings()
        self._receive_pool = self._settings.receive_pool or Pool("receive", _DEFAULT_POOL)
        self._send_pool = self._settings.send_pool or Pool("send", _DEFAULT_POOL)
        self._decoder = FrameDecoder()
        self._send_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._outstanding = trio.Semaphore(MAX_IN_FLIGHT)
        self._large_replies = trio.Semaphore(LARGE_REPLIES)
        self._handling = 0
        self._last_received = trio.current_time()
        self._scope = trio.CancelScope()
        self._stream_closed = False
        self._closed = trio.Event()

    def __str__(self) -> str:
        return f"{self.peer_id[:12]} ({self.address})"

    @property
    def silent_for(self) -> float:
        """Seconds since the last bytes arrived from this peer."""
        return trio.current_time() - self._last_received

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    # -- sending ------------------------------------------------------------

    async def send(self, msg: Message) -> None:
        """Send one message (a push, or a first ``hello``); ``PeerUnavailable`` if closed.

        ``ValueError`` (before anything is sent) if it is too large for a frame.
        """
        async with self._send_lock:
            self._check_open()
            header, body = encode_frame_parts(msg)
            with trio.CancelScope(shield=True) as scope:
                scope.relative_deadline = self._settings.dead_after
                try:
                    if len(body) >= _SPLIT_FROM:
                        await self._stream.send_all(header)
                        await self._stream.send_all(body)
                    else:
                        await self._stream.send_all(header + body)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._abort(f"send failed: {_cause(exc)}")
                    raise PeerUnavailable(f"{self}: {self.close_reason}") from exc
            if scope.cancelled_caught:
                self._abort(f"a frame took over {self._settings.dead_after:g} s to send")
                raise PeerUnavailable(f"{self}: {self.close_reason}")

    async def request(self, msg: Request, timeout: float | None = None) -> Message:
        """Send ``msg`` and wait for its reply (an ``Error`` reply is returned, not raised).

        ``PeerUnavailable`` if the connection closes or no reply comes within
        ``timeout`` (default ``request_timeout``).
        """
        limit = self._settings.request_timeout if timeout is None else timeout
        with trio.move_on_after(limit) as scope:
            async with self._outstanding:
                rid = next(self._ids)
                slot = _Pending(trio.Event())
                self._pending[rid] = slot
                try:
                    await self.send(replace(msg, id=rid))
                    await slot.event.wait()
                finally:
                    del self._pending[rid]
        if scope.cancelled_caught:
            raise PeerUnavailable(f"{self}: no reply to {msg.TYPE} within {limit:g} s")
        if slot.reply is None:
            raise PeerUnavailable(f"{self}: {self.close_reason}")
        return slot.reply

    async def ping(self, timeout: float | None = None) -> float:
        """Measure the round-trip time in milliseconds (also kept in ``rtt_ms``)."""
        start = trio.current_time()
        await self.request(Ping(), timeout)
        self.rtt_ms = (trio.current_time() - start) * 1000
        return self.rtt_ms

    def _check_open(self) -> None:
        if self.closed:
            raise PeerUnavailable(f"{self}: {self.close_reason}")

    # -- the connection's life ----------------------------------------------

    async def exchange_hello(self, hello: Hello) -> Hello:
        """Send our ``hello`` and read the peer's, which must be its first frame.

        Call before ``run``, under the caller's deadline. Frames that arrive
        with the hello or right behind it stay in the decoder; ``run`` takes
        them first.
        """
        self.first_hello = hello
        await self.send(hello)
        while (body := self._decoder.next_frame()) is None:
            self._decoder.feed(await self._receive())
        msg = decode_message(body)
        if not isinstance(msg, Hello):
            raise ProtocolError(f"expected hello, got {msg.TYPE}")
        self.remote_hello = msg
        return msg

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the connection until it closes, then close the stream."""
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    task_status.started()
                    nursery.start_soon(self._keepalive)
                    await self._read_loop(nursery)
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def aclose(self) -> None:
        """Close the connection; safe to call any number of times, from any task."""
        self._abort("closed locally", logging.DEBUG)
        if self._stream_closed:
            await self._closed.wait()
            return
        self._stream_closed = True
        try:
            await trio.aclose_forcefully(self._stream)
        finally:
            self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def _abort(self, reason: str, level: int = logging.INFO) -> None:
        """Mark closed (first reason wins, logged once), stop the tasks, fail waiters."""
        if self.closed:
            return
        self.close_reason = reason
        log.log(level, "connection with %s closed: %s", self, reason)
        self._scope.cancel()
        for slot in self._pending.values():
            slot.event.set()

    async def _receive(self) -> bytes:
        try:
            data = await self._stream.receive_some(_RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._abort(f"connection lost: {_cause(exc)}")
            raise PeerUnavailable(f"{self}: {self.close_reason}") from exc
        if not data:
            self._abort("closed by the peer")
            raise PeerUnavailable(f"{self}: closed by the peer")
        self._last_received = trio.current_time()
        return data

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        pool = self._receive_pool
        reserved = 0  # bytes of the pool taken for the frame whose body is being read
        due = math.inf  # when the rest of that body must have arrived
        try:
            while True:
                # The frames exchange_hello left in the decoder come first. Frames are
                # taken oldest first, so a reservation (taken only when none is left)
                # belongs to the next one.
                while (body := self._decoder.next_frame()) is not None:
                    held, reserved, due = reserved, 0, math.inf
                    if not held and len(body) >= RESERVE_FROM:  # it came whole in one read
                        held = len(body)
                        await pool.acquire(held)
                    try:
                        msg = decode_message(body)
                        del body
                    except BaseException:
                        if held:
                            pool.release(held)
                        raise
                    await self._dispatch(msg, nursery, held)
                if not reserved and (size := self._decoder.pending) >= RESERVE_FROM:
                    await pool.acquire(size)
                    reserved = size  # only once taken: a wait cancelled by a close holds nothing
                    due = trio.current_time() + self._settings.frame_time(size)
                with trio.CancelScope(deadline=due) as scope:
                    data = await self._receive()
                if scope.cancelled_caught:
                    limit = self._settings.frame_time(reserved)
                    self._abort(
                        f"frame of {reserved} bytes not received within {limit:.3g} s",
                        logging.WARNING,
                    )
                    return  # the stream is closed by run; finally frees the reservation
                self._decoder.feed(data)
        except ProtocolError as exc:
            self._abort(f"protocol error: {exc}", logging.WARNING)
        except PeerUnavailable:
            pass  # _receive has recorded why
        finally:
            if reserved:
                pool.release(reserved)

    async def _dispatch(self, msg: Message, nursery: trio.Nursery, held: int = 0) -> None:
        """Route one message; ``held`` bytes of the receive pool go with it and are freed."""
        if isinstance(msg, Request) or (isinstance(msg, UnknownRequest) and msg.id is not None):
            if self._handling >= MAX_IN_FLIGHT:
                if held:
                    self._receive_pool.release(held)
                raise ProtocolError(f"more than {MAX_IN_FLIGHT} requests in flight")
            self._handling += 1
            nursery.start_soon(self._serve_request, msg, held)
            return
        try:
            if isinstance(msg, Reply):
                slot = self._pending.get(msg.id)
                if slot is None:
                    log.debug("%s: reply %d came after its request gave up", self, msg.id)
                else:
                    slot.reply = msg
                    slot.event.set()
            else:
                await self._serve_push(msg)
        finally:
            if held:
                self._receive_pool.release(held)

    async def _serve_push(self, msg: Message) -> None:
        if isinstance(msg, Hello):
            self.remote_hello = msg
        handler = self._handlers.get(msg.TYPE)
        if handler is None:
            log.debug("%s: no handler for pushed %s", self, msg.TYPE)
            return
        try:
            await handler(self, msg)
        except ProtocolError:
            raise
        except Exception:
            log.exception("%s: handler for pushed %s failed", self, msg.TYPE)

    async def _serve_request(self, msg: Request | UnknownRequest, held: int = 0) -> None:
        rid, kind = msg.id, msg.TYPE
        large = isinstance(msg, Request) and msg.LARGE_REPLY
        slot = False  # one of this connection's LARGE_REPLIES
        sending = 0  # bytes of the send pool held for the reply
        try:
            try:
                if large:
                    await self._large_replies.acquire()
                    slot = True
                    await self._send_pool.acquire(MAX_FRAME)
                    sending = MAX_FRAME
                reply = await self._answer(msg)
            finally:
                del msg  # the request's body is freed before its reply goes out
                if held:
                    self._receive_pool.release(held)
            try:
                await self.send(replace(reply, id=rid))
            except ValueError as exc:  # a reply too large for a frame: a bug of ours
                log.error("%s: reply to %s could not be sent: %s", self, kind, exc)
                await self.send(Error(id=rid, code=INTERNAL, text="reply too large"))
        except ProtocolError as exc:
            self._abort(f"protocol error: {exc}", logging.WARNING)
        except PeerUnavailable:
            pass  # the connection is gone; nobody is waiting for this answer
        finally:
            if sending:
                self._send_pool.release(sending)
            if slot:
                self._large_replies.release()
            self._handling -= 1

    async def _answer(self, msg: Request | UnknownRequest) -> Reply:
        if isinstance(msg, Ping):
            return Pong()
        handler = None if isinstance(msg, UnknownRequest) else self._handlers.get(msg.TYPE)
        if handler is None:
            name = msg.type_name if isinstance(msg, UnknownRequest) else msg.TYPE
            return Error(code=UNKNOWN_TYPE, text=f"cannot serve {name!r}")
        try:
            reply = await handler(self, msg)
        except ProtocolError:
            raise
        except Exception:
            log.exception("%s: handler for %s failed", self, msg.TYPE)
            return Error(code=INTERNAL, text="internal error")
        if not isinstance(reply, Reply):
            log.error("%s: handler for %s returned %r, not a reply", self, msg.TYPE, reply)
            return Error(code=INTERNAL, text="internal error")
        return reply

    async def _keepalive(self) -> None:
        """Measure RTT now and every ``ping_interval``; close a peer silent for ``dead_after``."""
        settings = self._settings
        while True:
            try:
                await self.ping(timeout=settings.dead_after)
            except PeerUnavailable:
                # A long queue of big frames can delay a pong; only silence is death.
                if trio.current_time() - self._last_received >= settings.dead_after:
                    self._abort(f"no answer for {settings.dead_after:g} s")
                    return
            await trio.sleep(settings.ping_interval)


def _cause(exc: BaseException) -> str:
    """The underlying reason of a trio stream error, e.g. the TLS alert."""
    inner = exc.__cause__ or exc.__context__
    return str(inner or exc) or type(inner or exc).__name__
