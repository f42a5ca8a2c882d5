"""Close-to-open across nodes: a reader on B gets one whole version of a file rewritten on A.

A writer on node A keeps producing new versions of one 3–5 MiB file (several
1 MiB chunks; DESIGN.md §3), the sizes alternating between growing and
shrinking and never 4 KiB-aligned. Every 4 KiB block of version ``v`` starts
with a header naming ``v`` and the block's index, so any read can be judged
on its own: readers on node B keep opening the file, reading it to the end
and closing it, and each completed read must be exactly one version — every
block of the same ``v``, byte-identical to it, and as long as that version's
size — or fail with an errno (counted and reported: none is expected).
Since a remote change gives the path a new inode (DESIGN.md §3), every inode
number B's ``stat``/``fstat`` report must also keep one size: a size that
changes under one inode is the kernel caching one version's size for another
version's content, the way a torn read starts.

Two ways of rewriting, one test each: in place (``open('r+b')``, ``write``,
``truncate``, ``close``) and a new file renamed over the old one. CI runs
each for ``SWARMFS_TORN_SECONDS`` (default 8 s) after the swarm is up.
"""

from __future__ import annotations

import collections
import errno
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from swarm_harness import SYNC_TIMEOUT, Swarm, eventually

pytestmark = [pytest.mark.mounted, pytest.mark.slow]

MiB = 1024 * 1024
BLOCK = 4096
DURATION = float(os.environ.get("SWARMFS_TORN_SECONDS", 8.0))
READERS = 3
WRITER_PAUSE = 0.05  # pacing: lets B apply (and start reading) most versions before the next
_HEADER = b"torn-read version %08d block %06d\n"
HEADER_LEN = len(_HEADER % (0, 0))


def version_bytes(version: int, size: int) -> bytes:
    """Version ``version`` of the file: every 4 KiB block names the version and its index."""
    fill = bytes([0x41 + version % 26]) * (BLOCK - HEADER_LEN)
    whole = b"".join(_HEADER % (version, i) + fill for i in range(-(-size // BLOCK)))
    return whole[:size]


def version_size(rng: random.Random, version: int) -> int:
    """Odd versions 4–5 MiB, even ones 3–4 MiB (so each is a grow or a shrink), never
    block-aligned, and the last block long enough to hold its header."""
    base = 4 * MiB if version % 2 else 3 * MiB
    return base + rng.randrange(MiB // BLOCK) * BLOCK + rng.randrange(HEADER_LEN, BLOCK)


def judge(data: bytes, sizes: dict[int, int]) -> str | None:
    """None when ``data`` is exactly one complete version; else what is wrong with it."""
    if len(data) < HEADER_LEN:
        return f"{len(data)} bytes, shorter than one block header"
    try:
        first = int(data[18:26])
    except ValueError:
        return f"{len(data)} bytes, the first block has no header: {data[:HEADER_LEN]!r}"
    size = sizes.get(first)
    if size is None:
        return f"{len(data)} bytes, block 0 names version {first}, which was never written"
    if len(data) == size and data == version_bytes(first, size):
        return None
    found: collections.Counter[str] = collections.Counter()
    for off in range(0, len(data), BLOCK):
        head = data[off : off + HEADER_LEN]
        if head == bytes(len(head)):
            found["zeros"] += 1
        elif head[:18] == _HEADER[:18] and len(head) == HEADER_LEN:
            found[f"v{int(head[18:26])}"] += 1
        else:
            found["other"] += 1
    sized = {f"v{v}": sizes.get(v) for v in sorted(int(k[1:]) for k in found if k[0] == "v")}
    return (
        f"{len(data)} bytes read; block 0 says v{first} of {size} bytes;"
        f" blocks by version {dict(found)}; those versions' sizes {sized}"
    )


class Worker(threading.Thread):
    def __init__(self, name: str) -> None:
        super().__init__(daemon=True, name=name)
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.step()
        except BaseException as exc:  # reported by the test, not lost in a thread
            self.error = exc

    def step(self) -> None:
        raise NotImplementedError


class InodeSizes:
    """Every (inode, size) B reported; an inode seen with two sizes is a finding."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sizes: dict[int, int] = {}
        self.changed: list[str] = []

    def note(self, st: os.stat_result, who: str) -> None:
        with self._lock:
            seen = self._sizes.setdefault(st.st_ino, st.st_size)
            if seen != st.st_size:
                self.changed.append(f"{who}: inode {st.st_ino} was {seen} bytes, now {st.st_size}")


class Writer(Worker):
    """Rewrites ``path`` on node A, one new version per step."""

    def __init__(self, path: Path, rewrite: Callable[[Path, bytes], None], seed: int) -> None:
        super().__init__(f"writer of {path.name}")
        self.path = path
        self.rewrite = rewrite
        self.rng = random.Random(seed)
        self.sizes: dict[int, int] = {}
        self.version = 0

    def write_next(self) -> None:
        size = version_size(self.rng, self.version)
        self.sizes[self.version] = size  # before the write: a reader may see it at once
        self.rewrite(self.path, version_bytes(self.version, size))
        self.version += 1

    def step(self) -> None:
        self.write_next()
        time.sleep(WRITER_PAUSE)  # pacing only, see WRITER_PAUSE


class Reader(Worker):
    """Reads ``path`` whole on node B: open, fstat, read to EOF, close."""

    def __init__(self, path: Path, sizes: dict[int, int], inodes: InodeSizes, index: int) -> None:
        super().__init__(f"reader {index}")
        self.path = path
        self.sizes = sizes
        self.inodes = inodes
        self.complete = 0
        self.versions: set[int] = set()
        self.torn: list[str] = []
        self.errnos: collections.Counter[str] = collections.Counter()

    def step(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                st = os.fstat(fd)
                self.inodes.note(st, self.name)
                parts = []
                while part := os.read(fd, MiB):
                    parts.append(part)
            finally:
                os.close(fd)
        except OSError as exc:
            self.errnos[errno.errorcode.get(exc.errno or 0, str(exc.errno))] += 1
            return
        data = b"".join(parts)
        problem = judge(data, self.sizes)
        if problem is not None:
            self.torn.append(f"{problem} (fstat said {st.st_size}, inode {st.st_ino})")
            return
        self.complete += 1
        self.versions.add(int(data[18:26]))


class Lister(Worker):
    """Lists the directory on node B and stats what it finds, as a file manager polls."""

    def __init__(self, path: Path, inodes: InodeSizes) -> None:
        super().__init__("lister")
        self.path = path
        self.inodes = inodes
        self.listings = 0

    def step(self) -> None:
        try:
            for name in os.listdir(self.path.parent):  # readdirplus: attributes come with it
                self.inodes.note(os.stat(self.path.parent / name), self.name)
        except FileNotFoundError:
            pass  # the temporary file of a rename went between listdir and stat
        self.listings += 1


def rewrite_in_place(path: Path, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()


def rewrite_by_rename(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.mark.parametrize(
    "rewrite", [rewrite_in_place, rewrite_by_rename], ids=["in-place", "rename"]
)
def test_reader_on_b_sees_whole_versions_of_a_file_rewritten_on_a(
    swarm: Swarm, rewrite: Callable[[Path, bytes], None]
) -> None:
    a, b = swarm.start(2)
    writer = Writer(a.mnt / "doc.bin", rewrite, seed=7)
    writer.path.write_bytes(b"")
    writer.write_next()  # version 0, on B before the readers start
    first = version_bytes(0, writer.sizes[0])
    eventually(lambda: (b.mnt / "doc.bin").read_bytes() == first, SYNC_TIMEOUT, "version 0 on b")
    inodes = InodeSizes()
    readers = [Reader(b.mnt / "doc.bin", writer.sizes, inodes, i) for i in range(READERS)]
    lister = Lister(b.mnt / "doc.bin", inodes)
    workers: list[Worker] = [writer, *readers, lister]
    for w in workers:
        w.start()
    deadline = time.monotonic() + DURATION
    while time.monotonic() < deadline and all(w.is_alive() for w in workers):
        time.sleep(0.1)  # the test's own clock: the workers run meanwhile
    for w in workers:
        w.stop.set()
    for w in workers:
        w.join(60)
        assert not w.is_alive(), f"{w.name} is stuck"
    errors = [f"{w.name}: {w.error!r}" for w in workers if w.error is not None]
    assert not errors, errors

    last = writer.version - 1
    final = version_bytes(last, writer.sizes[last])
    eventually(lambda: (b.mnt / "doc.bin").read_bytes() == final, SYNC_TIMEOUT, f"v{last} on b")
    torn = [t for r in readers for t in r.torn]
    errnos = sum((r.errnos for r in readers), collections.Counter())
    complete = sum(r.complete for r in readers)
    seen = set().union(*(r.versions for r in readers))
    print(
        f"{rewrite.__name__}: {writer.version} versions written in {DURATION:g} s;"
        f" {complete} whole reads on b of {len(seen)} versions; {len(torn)} torn;"
        f" errnos {dict(errnos)}; {lister.listings} listings;"
        f" {len(inodes.changed)} inodes changed size"
    )
    assert not torn, f"{len(torn)} torn reads of {complete + len(torn)}: {torn[:5]}"
    assert not errnos, f"reads failed: {dict(errnos)}"
    assert not inodes.changed, f"an inode on b changed size: {inodes.changed[:5]}"
    assert writer.version >= 10, f"only {writer.version} versions were written"
    assert len(seen) >= 3, f"the readers saw only versions {sorted(seen)}: no concurrency"
