"""The control socket: how ``swarmfs status``/``umount`` talk to a running node.

An AF_UNIX stream socket at ``DIR/control.sock``, mode 0600 inside a 0700 data
dir, so only the owner can talk to the node. Requests and replies are
newline-delimited JSON objects, one reply per request, in order:
``{"cmd": "status"}`` → ``{...}``. A failed request gets ``{"error": "..."}``
and never takes the node down.

A data dir path may be longer than ``sun_path`` (108 bytes), so both sides
reach the socket through ``/proc/self/fd/<dirfd>/control.sock``, a short name
for the same directory that works for ``bind`` and ``connect`` alike.

``serve`` runs in the node's trio run; ``request`` is a plain blocking client
for the CLI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import trio

from swarmfs.datadir import DataDir
from swarmfs.errors import UserError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
"""Serves one command: takes the request object, returns the reply object."""

MAX_LINE = 1024 * 1024
"""A request or reply longer than this is refused: nothing legitimate comes near it."""


class NodeNotRunning(UserError):
    """No node listens on the data dir's control socket."""


class ControlError(UserError):
    """The node answered with an error, answered garbage, or did not answer in time."""


class ConnectionLost(ControlError):
    """The node closed the connection before answering, as a node that exits does."""


def _socket_path(target: Path | DataDir) -> Path:
    return target.control_socket if isinstance(target, DataDir) else Path(target)


@contextlib.contextmanager
def _short_path(path: Path) -> Iterator[str]:
    """A short name for ``path`` valid while the block runs: /proc/self/fd/N/NAME."""
    dirfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dirfd}/{path.name}"
    finally:
        os.close(dirfd)


# --- server ---


async def serve(
    target: Path | DataDir,
    handlers: Mapping[str, Handler],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handlers`` on the control socket until cancelled; removes the socket at exit.

    The caller holds the data dir's lock, so a socket file already there is a
    stale one left by a crash and is replaced.
    """
    path = _socket_path(target)
    with _short_path(path) as short:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(short).st_mode):
                os.unlink(short)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(short)
            os.chmod(short, 0o600)
            sock.listen()
        except OSError as exc:
            sock.close()
            raise UserError(f"cannot listen on control socket {path}: {exc.strerror}") from None
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    trio.serve_listeners, partial(_serve_connection, handlers), [listener]
                )
                log.debug("control socket listening at %s", path)
                task_status.started()
        finally:
            with contextlib.suppress(OSError):
                os.unlink(short)
            await listener.aclose()


async def _serve_connection(handlers: Mapping[str, Handler], stream: trio.SocketStream) -> None:
    try:
        async with stream:
            await _converse(handlers, stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away; nothing to answer
    except Exception:
        # One bad connection must not take the control socket (and the node) down.
        log.exception("control connection failed")


async def _converse(handlers: Mapping[str, Handler], stream: trio.SocketStream) -> None:
    """Answer each newline-terminated request, in order, until the client closes."""
    buffer = bytearray()
    while data := await stream.receive_some():
        buffer += data
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            await stream.send_all(await _dispatch(handlers, line))
        if len(buffer) > MAX_LINE:
            await stream.send_all(_encode({"error": "request too long"}))
            return


async def _dispatch(handlers: Mapping[str, Handler], line: bytes) -> bytes:
    try:
        request = json.loads(line)
    except ValueError as exc:
        return _encode({"error": f"invalid request: {exc}"})
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        return _encode({"error": 'invalid request: expected {"cmd": ...}'})
    handler = handlers.get(request["cmd"])
    if handler is None:
        return _encode({"error": f"unknown command {request['cmd']!r}"})
    try:
        return _encode(await handler(request))
    except Exception as exc:
        # A bug in one handler must not take the node down; the traceback goes to the log.
        log.exception("control command %r failed", request["cmd"])
        return _encode({"error": str(exc) or type(exc).__name__})


def _encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, separators=(",", ":")).encode() + b"\n"


# --- client ---


def request(
    target: Path | DataDir, payload: dict[str, Any], timeout: float = 5.0
) -> dict[str, Any]:
    """Send one request and return the node's reply.

    Raises NodeNotRunning when nothing listens, ControlError when the node
    answers ``{"error": ...}``, answers garbage, or is silent for ``timeout`` s.
    """
    path = _socket_path(target)
    node = f"the node on {path.parent}"
    deadline = time.monotonic() + timeout
    try:
        with _short_path(path) as short, socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(timeout)
            sock.connect(short)
            sock.sendall(json.dumps(payload).encode() + b"\n")
            reply = _receive_line(sock, deadline, node)
    except (FileNotFoundError, NotADirectoryError, ConnectionRefusedError) as exc:
        raise NodeNotRunning(f"no swarmfs node is running on {path.parent}") from exc
    except TimeoutError:
        raise ControlError(f"{node} did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise ConnectionLost(f"lost {node}: {exc.strerror or exc}") from None
    try:
        answer = json.loads(reply)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ControlError(f"{node} sent an invalid reply")
    if "error" in answer:
        raise ControlError(f"{node}: {answer['error']}")
    return answer


def _receive_line(sock: socket.socket, deadline: float, node: str) -> bytes:
    reply = b""
    while not reply.endswith(b"\n"):
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        data = sock.recv(65536)
        if not data:
            raise ConnectionLost(f"{node} closed the connection without answering")
        reply += data
        if len(reply) > MAX_LINE:
            raise ControlError(f"{node} sent an oversized reply")
    return reply
