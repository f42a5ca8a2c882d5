"""Load: 8 writers and 8 readers on 3 nodes at once, then every tree byte-identical.

Each writer owns a directory and keeps creating files in it (and deleting
some, keeping about a dozen) through one node's mount; each reader keeps reading
whatever it finds, through another node. Every file carries a header with the
SHA-256 of its body, so a reader can tell a torn or wrong read from a merely
older version (an empty file is the version ``open(O_CREAT)`` committed).
Afterwards every node's tree must equal the writers' final state, and no
node's peak memory (VmHWM) may exceed 300 MiB. CI: 30 s; the full run: 2 min.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultkit import FULL, MiB, assert_sound, proc_memory
from netns import FaultNode, FaultSwarm, loopback_swarm
from swarm_harness import eventually, tree_digests

pytestmark = [pytest.mark.mounted, pytest.mark.slow]

DURATION = float(os.environ.get("SWARMFS_LOAD_SECONDS", 120.0 if FULL else 30.0))
WRITERS = READERS = 8
FILES_PER_WRITER = 12
SIZES = (0, 100, 4096, 65_536, 300_000, MiB + 7, 2 * MiB)
HWM_BUDGET_KIB = 300 * 1024
_HEADER = struct.Struct(">4sI32s")


def content(rng: random.Random, size: int) -> bytes:
    body = rng.randbytes(size)
    return _HEADER.pack(b"SWLD", size, hashlib.sha256(body).digest()) + body


def well_formed(data: bytes) -> bool:
    if not data:
        return True
    magic, size, want = _HEADER.unpack_from(data)
    body = data[_HEADER.size :]
    return magic == b"SWLD" and size == len(body) and hashlib.sha256(body).digest() == want


def describe(data: bytes) -> str:
    """What a malformed read looks like: its length against the length its header claims."""
    if len(data) < _HEADER.size:
        return f"{len(data)} bytes, shorter than a header"
    magic, size, _ = _HEADER.unpack_from(data)
    return f"{len(data)} bytes read, header {magic!r} says {size + _HEADER.size}"


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[FaultSwarm]:
    with loopback_swarm(tmp_path) as nodes:
        yield nodes


class Worker(threading.Thread):
    ended = threading.Event()
    """Set when any worker's loop returns: before ``stop``, that is a failure."""

    def __init__(self, name: str) -> None:
        super().__init__(daemon=True, name=name)
        self.stop = threading.Event()
        self.ops = 0
        self.problems: list[str] = []

    def run(self) -> None:
        try:
            self.work()
        finally:
            Worker.ended.set()

    def work(self) -> None:
        raise NotImplementedError


class Writer(Worker):
    def __init__(self, node: FaultNode, index: int) -> None:
        super().__init__(f"writer {index} on {node.name}")
        self.dir = node.mnt / f"w{index}"
        self.rng = random.Random(index)
        self.final: dict[str, bytes | None] = {}

    def work(self) -> None:
        serial = 0
        while not self.stop.is_set():
            live = [n for n, d in self.final.items() if d is not None]
            if len(live) >= FILES_PER_WRITER or (live and self.rng.random() < 0.2):
                name = self.rng.choice(live)  # delete one
            else:
                serial += 1
                name = f"f{serial}"  # a new file: versions are never overwritten in place
            path = self.dir / name
            try:
                if self.final.get(name) is not None:
                    path.unlink()
                    self.final[name] = None
                else:
                    data = content(self.rng, self.rng.choice(SIZES))
                    path.write_bytes(data)
                    self.final[name] = data
            except OSError as exc:
                self.problems.append(f"{self.name}: {name}: {exc!r}")
                return
            self.ops += 1


class Reader(Worker):
    def __init__(self, node: FaultNode, index: int) -> None:
        super().__init__(f"reader {index} on {node.name}")
        self.root = node.mnt
        self.rng = random.Random(1000 + index)
        self.bytes = 0
        self.eio: list[str] = []
        self.torn: list[str] = []

    def work(self) -> None:
        while not self.stop.is_set():
            d = self.root / f"w{self.rng.randrange(WRITERS)}"
            path = d
            try:
                names = os.listdir(d)
                if not names:
                    continue
                path = d / self.rng.choice(names)
                data = path.read_bytes()
            except FileNotFoundError:
                continue  # deleted between listing and reading: fine
            except OSError as exc:
                if exc.errno == errno.EIO:
                    # never expected (a version's chunks must outlive its readers); counted
                    # and asserted on after the run, so one EIO does not hide the others
                    self.eio.append(f"{self.name}: {path.relative_to(self.root)}")
                    continue
                self.problems.append(f"{self.name}: {exc!r}")
                return
            if not well_formed(data):
                self.torn.append(f"{self.name}: torn or wrong content in {d}: {describe(data)}")
                continue
            self.ops += 1
            self.bytes += len(data)


def test_eight_writers_eight_readers_three_nodes(swarm: FaultSwarm) -> None:
    nodes = swarm.start(3)
    for node in nodes:
        # a rejected record is asserted on below, with a count, after the other checks
        node.expect_log(r"no peer could provide it|is on no reachable peer|sent an invalid record")
    writers = [Writer(nodes[i % 3], i) for i in range(WRITERS)]
    for w in writers:
        w.dir.mkdir()
    readers = [Reader(nodes[(i + 1) % 3], i) for i in range(READERS)]
    workers: list[Worker] = [*writers, *readers]
    Worker.ended.clear()
    for w in workers:
        w.start()
    Worker.ended.wait(DURATION)  # the load runs its time unless a worker gives up
    stopped = time.monotonic()
    for w in workers:
        w.stop.set()
    for w in workers:
        w.join(60)
        assert not w.is_alive(), f"{w.name} is stuck"
    problems = [p for w in workers for p in w.problems]
    assert not problems, problems

    expected = {f"w{i}": ("dir",) for i in range(WRITERS)}
    for i, w in enumerate(writers):
        for name, data in w.final.items():
            if data is not None:
                expected[f"w{i}/{name}"] = (
                    "file",
                    str(len(data)),
                    hashlib.sha256(data).hexdigest(),
                )

    def converged() -> bool:
        for node in nodes:
            tree = tree_digests(node.mnt)
            diff = sorted(set(tree.items()) ^ set(expected.items()))[:4]
            assert tree == expected, f"{node.name} differs: {diff}"
        return True

    eventually(converged, 120, "every node to hold the writers' final tree")
    peak = {node.name: proc_memory(node.pid or -1)["VmHWM"] for node in nodes}  # a high-water mark
    writes = sum(w.ops for w in writers)
    reads = sum(r.ops for r in readers)
    read_mib = sum(r.bytes for r in readers) / MiB
    eio = [e for r in readers for e in r.eio]
    print(
        f"{DURATION:g} s: {writes} writes, {reads} reads ({read_mib:.0f} MiB, {len(eio)} EIO);"
        f" converged {time.monotonic() - stopped:.1f} s later; VmHWM KiB {peak}"
    )
    assert max(peak.values()) < HWM_BUDGET_KIB, peak
    for node in nodes:
        assert_sound(node, after_restart=False)
    rejected = [ln for n in nodes for ln in n.log_text().splitlines() if "invalid record" in ln]
    assert not rejected, f"{len(rejected)} records sent were rejected: {rejected[:3]}"
    torn = [t for r in readers for t in r.torn]
    assert not torn, f"{len(torn)} torn reads: {torn[:3]}"
    assert not eio, f"{len(eio)} reads failed with EIO: {eio[:3]}"
