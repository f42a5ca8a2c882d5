"""TLS over a trio socket stream, decrypting every record one socket read brought in.

``trio.SSLStream`` returns one TLS record (at most 16 KiB) per ``receive_some``
and goes through the scheduler for each, and reads the socket 64 KiB at a
time: a 1 MiB chunk cost 64 trips through the event loop, which with the rest
of a node's work on the loop made fetching a file from a peer run at a fifth of
what one bare TLS connection carries. Here a ``receive_some`` reads up to
``RECEIVE_SIZE`` bytes from the socket and returns everything they decrypt to.

The connection only ever speaks TLS 1.3 between swarmfs nodes
(``crypto.certs``), so there is no renegotiation to handle, and no session
tickets (the server context sends none). Records the TLS layer makes on its
own while reading (an alert, a key update) go out under the same lock as the
data, in the order they were made.

Errors: whatever fails in TLS raises ``trio.BrokenResourceError`` with the
``ssl.SSLError`` as its cause (``swarm.membership`` names the reason from it),
as ``trio.SSLStream`` does; a close by the peer without ``close_notify`` is such
an error, a clean close returns ``b""``.
"""

from __future__ import annotations

import contextlib
import ssl

import trio

RECEIVE_SIZE = 256 * 1024
"""Bytes asked of the socket at a time (a chunk frame arrives in about four reads)."""


class TLSStream(trio.abc.Stream):
    """One TLS connection over ``transport``; call ``do_handshake`` first."""

    def __init__(
        self, transport: trio.abc.Stream, context: ssl.SSLContext, *, server_side: bool
    ) -> None:
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=None
        )
        self._send_lock = trio.StrictFIFOLock()  # records reach the socket in the order made
        self._buffer = bytearray(RECEIVE_SIZE)
        self._handshake_done = False
        self._broken = False
        self._broken_by: BaseException | None = None  # the cause later calls are raised from
        self._closed = False
        self._receiving = False
        self._sending = False

    def getpeercert(self, binary_form: bool = False) -> object:
        return self._tls.getpeercert(binary_form)

    async def do_handshake(self) -> None:
        """Run the handshake (under the caller's deadline); the certificates are checked
        by the context. Cancelled part-way, the stream is unusable."""
        self._check()
        while True:
            try:
                self._tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False  # not awaited in here: a hang-up would carry it as its context
            except (ssl.SSLError, ssl.CertificateError) as exc:
                await self._fail_after_alert(exc)
            await self._flush()
            if done:
                self._handshake_done = True
                return
            await self._fill()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            self._check_ready()
            await trio.lowlevel.checkpoint_if_cancelled()
            limit = RECEIVE_SIZE if max_bytes is None else max(1, min(max_bytes, RECEIVE_SIZE))
            waited = False
            while True:
                data = await self._decrypted(limit)
                if data is not None:
                    break
                await self._fill()
                waited = True
            if not waited:  # a checkpoint that cannot throw away what was decrypted
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            self._check_ready()
            async with self._send_lock:
                view = memoryview(data)
                while view:
                    try:
                        written = self._tls.write(view)
                    except ssl.SSLError as exc:
                        raise self._break(exc) from exc
                    view = view[written:]
                await self._send_outgoing()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        self._check_ready()
        await self.transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Send ``close_notify`` (if the stream is healthy and the caller not cancelled)
        and close the socket."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if self._handshake_done and not self._broken:
                with contextlib.suppress(ssl.SSLError):  # the peer's close_notify is not awaited
                    self._tls.unwrap()
                async with self._send_lock:
                    await self._send_outgoing()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await self.transport.aclose()

    # -- internals ------------------------------------------------------------------

    async def _decrypted(self, limit: int) -> bytes | None:
        """Everything the bytes received so far decrypt to (up to ``limit``); ``b""`` at
        a clean close; ``None`` when more bytes must be read from the socket first."""
        view = memoryview(self._buffer)
        got = 0
        clean_close = False
        while got < limit:
            try:
                n = self._tls.read(limit - got, view[got:])
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLError, ssl.CertificateError) as exc:
                await self._fail_after_alert(exc)
            if n == 0:  # the peer's close_notify
                clean_close = True
                break
            got += n
        if self._outgoing.pending:  # a key update made while reading
            await self._flush_unless_sending()
        if got:
            return bytes(view[:got])
        return b"" if clean_close else None

    async def _fill(self) -> None:
        """Read the socket into the TLS layer (end of stream included)."""
        try:
            data = await self.transport.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._break(exc)
            raise
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def _flush(self) -> None:
        async with self._send_lock:
            await self._send_outgoing()

    async def _send_outgoing(self) -> None:
        """Send what the TLS layer has made; the caller holds the send lock."""
        data = self._outgoing.read()
        if not data:
            return
        try:
            await self.transport.send_all(data)
        except BaseException as exc:
            self._break(exc)  # some unknown part of a record went out
            raise

    async def _flush_unless_sending(self) -> None:
        """Send what the TLS layer made while reading, unless a sender holds the socket:
        the reader never waits to send (``net.peer``); the sender's next flush takes it."""
        if not self._send_lock.locked():
            await self._flush()

    async def _fail_after_alert(self, exc: BaseException) -> None:
        """Tell the peer why (the alert TLS made, best effort), then raise."""
        error = self._break(exc)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._flush_unless_sending()
        raise error from exc

    def _break(self, exc: BaseException) -> trio.BrokenResourceError:
        """Mark the stream unusable because of ``exc``; the error to raise for it."""
        if not self._broken:
            self._broken, self._broken_by = True, exc
        return trio.BrokenResourceError(str(exc))

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError
        if self._broken:
            raise trio.BrokenResourceError(str(self._broken_by)) from self._broken_by

    def _check_ready(self) -> None:
        self._check()
        if not self._handshake_done:
            raise RuntimeError("do_handshake first")
