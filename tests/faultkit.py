"""Shared pieces of the fault tests (test_faults_*.py, test_hostile_peer.py).

- ``FULL``: set by ``contrib/faults/run-full.sh`` (``SWARMFS_FAULTS_FULL=1``) for
  the long versions; CI runs the short ones.
- ``proc_memory``: VmRSS/VmHWM of a node from ``/proc`` (KiB).
- ``assert_sound``: the invariants every fault test ends with: every chunk
  file is named by its SHA-256, no half-written chunk is left in
  ``chunks/tmp``, and ``swarmfs fsck`` exits 0 (any other exit fails, with its output).
- ``small_disk``/``fill_disk``: a real full disk (a tmpfs of a given size, filled
  until it says ENOSPC).
- ``Writer``: a thread that writes one big file block by block and reports
  its progress, so a test can kill the node "half-way" by polling a counter.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounted import swarmfs_command
from swarm_harness import SwarmNode, bad_chunks, chunk_files, eventually

FULL = os.environ.get("SWARMFS_FAULTS_FULL") == "1"
MiB = 1024 * 1024


def payload(size: int, seed: int) -> bytes:
    """Incompressible, reproducible bytes."""
    return random.Random(seed).randbytes(size)


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path``, unmounted (lazily if busy) on exit."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill_disk(disk: Path) -> Path:
    """Write a ballast file on ``disk`` until the disk says ENOSPC; returns it."""
    ballast = disk / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        block = bytes(MiB)
        while True:
            os.write(fd, block)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return ballast


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def proc_memory(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak) of ``pid`` in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def chunk_ids(data_dir: Path) -> set[str]:
    return {p.name for p in chunk_files(data_dir)}


def leftover_tmp(data_dir: Path) -> list[str]:
    tmp = data_dir / "chunks" / "tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []


def fsck(data_dir: Path) -> subprocess.CompletedProcess[str]:
    """``swarmfs fsck --data-dir DIR`` (exit 0: nothing to repair)."""
    return subprocess.run(
        [*swarmfs_command(), "fsck", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_sound(node: SwarmNode, *, after_restart: bool = True) -> None:
    """No chunk under a wrong name, nothing half-written kept, nothing for fsck to repair."""
    assert bad_chunks(node.data_dir) == [], bad_chunks(node.data_dir)
    if after_restart:
        assert leftover_tmp(node.data_dir) == [], "chunks/tmp not cleaned at start"
    result = fsck(node.data_dir)
    assert result.returncode == 0, (
        f"fsck on {node.name} exited {result.returncode}: {result.stdout}{result.stderr}"
    )


def wait_backlog_empty(node: SwarmNode, timeout: float) -> None:
    def empty() -> bool:
        backlog = node.status()["backlog"]
        assert backlog["chunks"] == 0, backlog
        return True

    eventually(empty, timeout, f"{node.name}'s push backlog to drain")


class Writer(threading.Thread):
    """Writes ``size`` reproducible random bytes to ``path`` in 1 MiB blocks.

    ``written`` counts bytes the kernel accepted; ``error`` is what stopped it
    (a node killed under it gives ENOTCONN or EIO). With ``pause_at``, the
    writer stops there with the file open, sets ``paused`` and waits for
    ``resume``: the test kills the node at a known point of a large write.
    """

    def __init__(
        self, path: Path, size: int, seed: int, pause_at: int | None = None, block: int = MiB
    ) -> None:
        super().__init__(daemon=True, name=f"writer {path.name}")
        self.path = path
        self.size = size
        self.seed = seed
        self.block = block
        self.pause_at = pause_at
        self.paused = threading.Event()
        self.resume = threading.Event()
        self.written = 0
        self.error: OSError | None = None
        self.closed = False

    def run(self) -> None:
        rng = random.Random(self.seed)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            self.error = exc
            return
        try:
            while self.written < self.size:
                if self.pause_at is not None and self.written >= self.pause_at:
                    self.pause_at = None
                    self.paused.set()
                    self.resume.wait(120)
                n = min(self.block, self.size - self.written)
                data = rng.randbytes(n)
                view = memoryview(data)
                while view:
                    done = os.write(fd, view)
                    view = view[done:]
                    self.written += done
        except OSError as exc:
            self.error = exc
        finally:
            try:
                os.close(fd)
                self.closed = self.error is None
            except OSError as exc:
                self.error = self.error or exc


def crash(node: SwarmNode) -> None:
    """``kill -9`` the node; its next mount clears the dead mount with a warning (expected)."""
    node.kill9()
    node.expect_log(r"left dead by a crashed node")
