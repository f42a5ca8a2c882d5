"""A full disk (DESIGN.md §6 "Disk full", §5 "Replication": ``no_space``).

A node's data dir lives on a small tmpfs (``mount -t tmpfs -o size=64m``)
that a ballast file next to it fills up. The writer gets ENOSPC (from
``write`` or ``close``), nothing committed is damaged, and once the ballast
is removed the same node process goes on writing. A peer whose disk is full
answers ``chunk_put`` with ``no_space`` and the push moves to the next peer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from faultkit import (
    MiB,
    assert_sound,
    chunk_ids,
    crash,
    digest,
    payload,
    small_disk,
    wait_backlog_empty,
)
from netns import FaultNode, FaultSwarm, loopback_swarm
from swarm_harness import SYNC_TIMEOUT, eventually

pytestmark = pytest.mark.mounted


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` with a ballast file until ``leave`` bytes are free."""
    ballast = disk / "ballast"
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(ballast, "wb") as f:
        todo = max(0, free - leave)
        block = bytes(MiB)
        while todo > 0:
            todo -= f.write(block[: min(MiB, todo)])
    return ballast


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Make small tmpfs disks; unmounted after the swarm (which depends on this) is down."""
    with contextlib.ExitStack() as stack:
        yield lambda name: stack.enter_context(small_disk(tmp_path / name, "64m"))


@pytest.fixture
def swarm(disks: Callable[[str], Path], tmp_path: Path) -> Iterator[FaultSwarm]:
    with loopback_swarm(tmp_path) as nodes:
        yield nodes


def _on_disk(node: FaultNode, disk: Path) -> None:
    node.data_dir = disk / "data"


class NodeHang(AssertionError):
    """A file system call on the mount never got an answer from the node."""


def _bounded(node: FaultNode, seconds: float, fn: Callable[[], object], what: str) -> None:
    """Run ``fn`` (a file system call on ``node``'s mount); if it hangs, kill the node so the
    caller's thread is released, and fail."""
    done = threading.Event()
    error: list[BaseException] = []

    def call() -> None:
        try:
            fn()
        except BaseException as exc:
            error.append(exc)
        finally:
            done.set()

    threading.Thread(target=call, daemon=True).start()
    if not done.wait(seconds):
        crash(node)  # a FUSE request that never gets an answer holds its caller in D state
        done.wait(30)
        raise NodeHang(f"{what} did not return within {seconds:g} s (the node never answered)")
    if error:
        raise error[0]


def test_enospc_reaches_the_writer_and_the_node_goes_on(
    swarm: FaultSwarm, disks: Callable[[str], Path]
) -> None:
    disk = disks("disk-a")
    a = swarm.add("a")
    _on_disk(a, disk)
    a.start()
    committed = {}
    for i in range(3):
        data = payload(4 * MiB + i, 70 + i)
        (a.mnt / f"kept{i}.bin").write_bytes(data)
        committed[f"kept{i}.bin"] = digest(data)
    ballast = fill(disk, leave=12 * MiB)
    a.expect_log(r"(?i)no space|ENOSPC|errno 28|disk is full")
    pid = a.pid

    failure, where = None, "write"
    try:
        with open(a.mnt / "too-big.bin", "wb") as f:
            for i in range(40):
                f.write(payload(MiB, 80 + i))
            where = "close"
    except OSError as exc:
        failure = exc
    assert failure is not None, "40 MiB fitted into 12 MiB"
    assert failure.errno == errno.ENOSPC, f"expected ENOSPC, got {failure!r}"
    print(f"ENOSPC from {where}; {free_bytes(disk) // 1024} KiB left free")

    for name, want in committed.items():
        assert digest((a.mnt / name).read_bytes()) == want, f"{name} damaged by ENOSPC"
    assert a.answers() and a.pid == pid

    # free the space: the same node process goes on
    ballast.unlink()
    data = payload(8 * MiB, 90)
    (a.mnt / "after.bin").write_bytes(data)
    assert digest((a.mnt / "after.bin").read_bytes()) == digest(data)
    for name, want in committed.items():
        assert digest((a.mnt / name).read_bytes()) == want
    _bounded(a, 10, (a.mnt / "too-big.bin").unlink, "unlink of the file that hit ENOSPC")
    assert a.pid == pid and a.status()["running"]
    # the node still shuts down cleanly (umount commits what is open, then exits)
    _bounded(a, 40, a.stop, "swarmfs umount after ENOSPC")
    assert_sound(a)  # no half-written chunk left behind by the failed write
    a.start()
    for name, want in {**committed, "after.bin": digest(data)}.items():
        assert digest((a.mnt / name).read_bytes()) == want, f"{name} after restart"
    assert not (a.mnt / "too-big.bin").exists()


def test_full_peer_answers_no_space_and_the_push_moves_on(
    swarm: FaultSwarm, disks: Callable[[str], Path]
) -> None:
    disk = disks("disk-c")
    a = swarm.add("a", replicas=2)
    b = swarm.add("b", replicas=2)
    c = swarm.add("c", replicas=2)
    _on_disk(c, disk)
    for node in (a, b, c):
        node.start()
    swarm.wait_connected()
    fill(disk, leave=6 * MiB)  # c's disk is (nearly) full

    before = chunk_ids(a.data_dir)
    data = payload(12 * MiB, 95)
    (a.mnt / "f.bin").write_bytes(data)
    new = chunk_ids(a.data_dir) - before
    assert len(new) >= 12
    wait_backlog_empty(a, 60)
    on_b = chunk_ids(b.data_dir)
    on_c = chunk_ids(c.data_dir)
    assert new <= on_b, f"{len(new - on_b)} chunks reached neither b nor c"
    assert not new & on_c, "the full peer stored chunks"
    refused = [line for line in a.log_text().splitlines() if "no_space" in line]
    assert refused, "no push was ever refused by the full peer (rendezvous never chose c?)"
    print(f"{len(refused)} of {len(new)} pushes refused with no_space by c and moved to b")
    eventually(lambda: (c.mnt / "f.bin").stat().st_size == len(data), SYNC_TIMEOUT, "record")
    for node in (a, b, c):
        assert_sound(node, after_restart=False)


# -- bad local data -----------------------------------------------------------------------


def _chunk_path(node: FaultNode, chunk_id: str) -> Path:
    return node.data_dir / "chunks" / chunk_id[:2] / chunk_id[2:4] / chunk_id


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for at in (0, len(data) // 2, len(data) - 1):
        data[at] ^= 0x5A
    path.write_bytes(bytes(data))


class SlowEIO(AssertionError):
    """A read of a chunk that no peer holds took far longer than one fetch timeout."""


@pytest.mark.slow
def test_corrupt_chunks_are_repaired_from_a_peer_or_give_eio(swarm: FaultSwarm) -> None:
    a, b = swarm.start(2, replicas="all")
    before = chunk_ids(a.data_dir)
    good = payload(3 * MiB + 100, 101)
    (a.mnt / "repairable.bin").write_bytes(good)
    repairable = sorted(chunk_ids(a.data_dir) - before)
    before = chunk_ids(a.data_dir)
    lost = payload(2 * MiB, 102)
    (a.mnt / "lost.bin").write_bytes(lost)
    lost_chunks = sorted(chunk_ids(a.data_dir) - before)
    assert len(repairable) == 4 and len(lost_chunks) == 2
    wait_backlog_empty(a, 60)
    assert set(repairable) | set(lost_chunks) <= chunk_ids(b.data_dir)

    a.stop()  # damage on disk while a is down, so no cache of a's remembers the content
    flipped, truncated, deleted = (_chunk_path(a, c) for c in repairable[:3])
    _flip(flipped)
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    deleted.unlink()
    victim = lost_chunks[1]
    _flip(_chunk_path(a, victim))
    _chunk_path(b, victim).unlink()  # and no peer holds a good copy
    # b only serves chunks (and answers ``missing`` for the one deleted): it logs no warning
    a.expect_log(rf"{victim[:16]}|corrupt|fetching a good copy|no peer could provide")
    a.start()
    swarm.wait_connected()

    # fetched from b and repaired locally
    assert digest((a.mnt / "repairable.bin").read_bytes()) == digest(good)

    def repaired() -> bool:  # the good copy is written after the reader has its data
        for chunk_id in repairable:
            path = _chunk_path(a, chunk_id)
            assert path.exists() and digest(path.read_bytes()) == chunk_id, f"{chunk_id} bad"
        return True

    eventually(repaired, 10, "a to write the good copies it fetched")

    # nobody has the second: EIO, never wrong data, and the log names the chunk
    started = time.monotonic()
    try:
        cat = subprocess.run(["cat", str(a.mnt / "lost.bin")], capture_output=True, timeout=35)
    except subprocess.TimeoutExpired as exc:
        raise SlowEIO(f"cat of lost.bin had no answer after {exc.timeout:g} s") from None
    waited = time.monotonic() - started
    assert cat.returncode != 0 and b"Input/output error" in cat.stderr, cat
    assert cat.stdout == lost[: len(cat.stdout)], "wrong data was served"
    named = [ln for ln in a.log_text().splitlines() if victim[:16] in ln]
    assert named, f"the log does not name chunk {victim[:16]}"
    print(f"EIO after {waited:.1f} s; log: {named[-1][:200]}")
