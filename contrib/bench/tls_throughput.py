"""How fast do chunk frames move over one swarm TLS connection, next to plain TCP?

Two processes on loopback. The receiver (this script re-run with ``--receive``)
listens on 127.0.0.1 port 0 and reports the port on stdout; the sender (this
process) connects and streams ``--size-mib`` MiB as 1 MiB ``chunk_put``
frames. Over TLS the path is the node's: mutual TLS 1.3 with swarm
certificates (``crypto.certs``) through ``net.tls.TLSStream``,
``wire.encode_frame`` on one side and ``FrameDecoder`` + ``decode_message``
(full validation) on the other. The plain
TCP run moves the same bytes without TLS or decoding: the ceiling.

    .venv/bin/python contrib/bench/tls_throughput.py [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import trio

from swarmfs import CHUNK_SIZE
from swarmfs.crypto.certs import client_context, server_context
from swarmfs.crypto.keys import (
    NodeIdentity,
    encode_swarm_key,
    new_swarm_key,
    read_swarm_key,
    write_secret,
)
from swarmfs.net.tls import TLSStream
from swarmfs.net.wire import ChunkPut, FrameDecoder, decode_message, encode_frame

_RECEIVE_SIZE = 256 * 1024
_DONE = b"ok"


async def _receive(directory: Path, mode: str, frames: int) -> None:
    """Accept one connection, consume ``frames`` chunk frames, answer ``ok``."""
    done = trio.Event()

    async def serve(tcp: trio.SocketStream) -> None:
        stream: trio.abc.Stream = tcp
        if mode == "tls":
            ctx = server_context(
                NodeIdentity.load(directory / "receiver.key"),
                read_swarm_key(directory / "swarm.key"),
                directory,
            )
            stream = TLSStream(tcp, ctx, server_side=True)
            await stream.do_handshake()
        expected = frames * _frame_size()
        received = decoded = 0
        decoder = FrameDecoder()
        while received < expected:
            data = await stream.receive_some(_RECEIVE_SIZE)
            if not data:
                raise SystemExit("sender hung up early")
            received += len(data)
            if mode == "tls":
                for body in decoder.feed(data):
                    assert isinstance(decode_message(body), ChunkPut)
                    decoded += 1
        if mode == "tls" and decoded != frames:
            raise SystemExit(f"decoded {decoded} frames, expected {frames}")
        await stream.send_all(_DONE)
        await stream.aclose()
        done.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        print(listeners[0].socket.getsockname()[1], flush=True)
        await done.wait()
        nursery.cancel_scope.cancel()


async def _send(directory: Path, mode: str, port: int, frames: int) -> float:
    """Stream the frames; seconds from the first byte to the receiver's ``ok``."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream: trio.abc.Stream = tcp
    if mode == "tls":
        ctx = client_context(
            NodeIdentity.load(directory / "sender.key"),
            read_swarm_key(directory / "swarm.key"),
            directory,
        )
        stream = TLSStream(tcp, ctx, server_side=False)
        await stream.do_handshake()
    payload = os.urandom(CHUNK_SIZE + 17)  # a chunk's ciphertext: format byte + data + tag
    start = trio.current_time()
    for i in range(frames):
        chunk_id = i.to_bytes(32, "big")
        # One id for all: every frame then has the same size, which the receiver counts on.
        await stream.send_all(encode_frame(ChunkPut(id=1, chunk_id=chunk_id, data=payload)))
    reply = await stream.receive_some(len(_DONE))
    elapsed = trio.current_time() - start
    if reply != _DONE:
        raise SystemExit(f"receiver answered {reply!r}")
    await stream.aclose()
    return elapsed


def _frame_size() -> int:
    return len(encode_frame(ChunkPut(id=1, chunk_id=bytes(32), data=bytes(CHUNK_SIZE + 17))))


def _run(directory: Path, mode: str, frames: int) -> float:
    receiver = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--receive",
            mode,
            "--dir",
            str(directory),
            "--frames",
            str(frames),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        port = int(receiver.stdout.readline())
        elapsed = trio.run(_send, directory, mode, port, frames)
        if receiver.wait(timeout=60) != 0:
            raise SystemExit(f"{mode} receiver failed")
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="data to move (MiB)")
    parser.add_argument("--receive", choices=["tls", "tcp"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receive:
        trio.run(_receive, args.dir, args.receive, args.frames)
        return

    frames = args.size_mib
    moved = frames * _frame_size()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        write_secret(directory / "swarm.key", encode_swarm_key(new_swarm_key()))
        NodeIdentity.generate().save(directory / "sender.key")
        NodeIdentity.generate().save(directory / "receiver.key")
        for mode, label in (("tcp", "plain TCP"), ("tls", "TLS 1.3 + frame decode")):
            seconds = _run(directory, mode, frames)
            rate = moved / seconds / 1e6
            print(f"{label:<24} {moved / 2**20:8.0f} MiB in {seconds:6.2f} s  {rate:8.1f} MB/s")


if __name__ == "__main__":
    main()
