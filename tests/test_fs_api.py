"""``fs.namespace.Filesystem`` called directly, without a mount (as S3QL's ``t3_fs_api``).

Each test builds the node's layers by hand in a temporary data dir (Database,
ChunkStore, ChunkIO, Filesystem: what ``node.py`` does) and drives them the
way the kernel would: lookup counts, handles, flush before release, forget.
A warning or error logged by swarmfs fails the test unless declared.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import random
import stat
import threading
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from swarmfs import CHUNK_SIZE
from swarmfs.errors import CorruptChunk
from swarmfs.fs.content import ChunkIO
from swarmfs.fs.namespace import MAX_FILE_SIZE, Caller, Filesystem, FsError
from swarmfs.fuse.operations import Operations
from swarmfs.meta.db import ROOT_INO, Database
from swarmfs.meta.records import Block, Kind, Record
from swarmfs.store.cas import ChunkStore

MiB = CHUNK_SIZE
NODE = "testnodetestnodetestnode00"
KEY = bytes(range(32, 64))
CALLER = Caller(uid=0, gid=0, umask=0o022)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


class Harness:
    """One node's fs layers over a data dir; ``restart()`` reopens them (a new process)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.chunks_dir = root / "chunks"
        self.staging_dir = root / "staging"
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self._open()

    def _open(self) -> None:
        self.db = Database(self.root / "swarmfs.db", NODE)
        self.store = ChunkStore(self.chunks_dir)
        self.chunks = ChunkIO(self.store, KEY)
        self.fs = Filesystem(self.db, self.chunks, self.staging_dir)

    def restart(self) -> None:
        self.db.close()
        self._open()

    def close(self) -> None:
        self.db.close()

    # -- the kernel's side of the protocol ------------------------------------------
    async def create(
        self, name: bytes, data: bytes = b"", parent: int = ROOT_INO, flags: int = os.O_RDWR
    ) -> tuple[int, int]:
        """create + write; returns (fh, ino) with the handle still open and one lookup."""
        fh, attr = await self.fs.create(parent, name, 0o644, flags, CALLER)
        if data:
            assert await self.fs.write(fh, 0, data) == len(data)
        return fh, attr.ino

    async def put(self, name: bytes, data: bytes, parent: int = ROOT_INO) -> int:
        """A whole file written and closed (flush, release); returns its inode."""
        fh, ino = await self.create(name, data, parent)
        await self.fs.flush(fh)
        await self.fs.release(fh)
        return ino

    async def ino(self, name: bytes, parent: int = ROOT_INO) -> int:
        return (await self.fs.lookup(parent, name)).ino

    async def size(self, ino: int) -> int:
        return (await self.fs.getattr(ino)).size

    async def read_all(self, fh: int, ino: int) -> bytes:
        size = await self.size(ino)
        data = await self.fs.read(fh, 0, size + 4096)
        assert len(data) == size
        return data

    async def cat(self, ino: int) -> bytes:
        fh = await self.fs.open(ino, os.O_RDONLY)
        try:
            return await self.read_all(fh, ino)
        finally:
            await self.fs.flush(fh)
            await self.fs.release(fh)

    def chunk_files(self) -> set[str]:
        return {
            p.name for p in self.chunks_dir.rglob("*") if p.is_file() and p.parent.name != "tmp"
        }

    def data_dir_bytes(self) -> bytes:
        return b"".join(p.read_bytes() for p in sorted(self.root.rglob("*")) if p.is_file())


def errno_of(exc_info: pytest.ExceptionInfo[FsError]) -> int:
    return exc_info.value.errno


@pytest.fixture
async def h(tmp_path: Path):
    harness = Harness(tmp_path / "data")
    yield harness
    harness.close()


@pytest.fixture(autouse=True)
def no_unexpected_log(caplog: pytest.LogCaptureFixture):
    """Habit 11: swarmfs must not warn or fail behind the test's back."""
    caplog.set_level(logging.INFO, logger="swarmfs")
    yield caplog
    bad = [
        r
        for r in caplog.get_records("call")
        if r.levelno >= logging.WARNING
        and r.name.startswith("swarmfs")
        and not getattr(r, "expected", False)
    ]
    assert not bad, [f"{r.levelname} {r.name}: {r.getMessage()}" for r in bad]


def rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# --- content: holes, append, truncate -------------------------------------------------


async def test_writes_at_offsets_leave_holes_that_read_as_zeros(h: Harness) -> None:
    fh, ino = await h.create(b"sparse")
    await h.fs.write(fh, 0, b"head")
    far = 3 * MiB + 5
    await h.fs.write(fh, far, b"tail")
    expected = b"head" + bytes(far - 4) + b"tail"
    assert await h.read_all(fh, ino) == expected  # staged
    await h.fs.flush(fh)
    assert await h.read_all(fh, ino) == expected  # committed
    # a read straddling the hole's chunk boundaries
    assert await h.fs.read(fh, MiB - 2, 4) == bytes(4)
    assert await h.fs.read(fh, far - 2, 10) == b"\0\0tail"
    await h.fs.release(fh)
    # only the two written chunks are stored; the hole chunks 1 and 2 are not
    assert len(h.chunk_files()) == 2
    h.restart()
    assert await h.cat(await h.ino(b"sparse")) == expected


async def test_write_inside_a_hole_of_a_committed_file(h: Harness) -> None:
    ino = await h.put(b"f", b"x")
    fh = await h.fs.open(ino, os.O_RDWR)
    await h.fs.write(fh, 2 * MiB + 7, b"y")
    await h.fs.flush(fh)
    await h.fs.write(fh, MiB + 100, b"z")
    await h.fs.flush(fh)
    await h.fs.release(fh)
    expected = bytearray(2 * MiB + 8)
    expected[0:1], expected[MiB + 100 : MiB + 101], expected[-1:] = b"x", b"z", b"y"
    assert await h.cat(ino) == bytes(expected)


async def test_append_through_offsets_and_o_append(h: Harness) -> None:
    ino = await h.put(b"log", b"line1\n")
    fh = await h.fs.open(ino, os.O_WRONLY | os.O_APPEND)
    # O_APPEND: the offset the kernel passes is ignored, writes go to the end
    await h.fs.write(fh, 0, b"line2\n")
    await h.fs.write(fh, 0, b"line3\n")
    await h.fs.flush(fh)
    await h.fs.release(fh)
    assert await h.cat(ino) == b"line1\nline2\nline3\n"
    fh = await h.fs.open(ino, os.O_WRONLY)
    size = await h.size(ino)
    big = rand(MiB + 10)
    await h.fs.write(fh, size, big)
    await h.fs.flush(fh)
    await h.fs.release(fh)
    assert await h.cat(ino) == b"line1\nline2\nline3\n" + big


@pytest.mark.parametrize("commit_between", [False, True], ids=["staged", "committed"])
async def test_truncate_down_then_up_reads_zeros_not_old_data(
    h: Harness, commit_between: bool
) -> None:
    original = rand(2 * MiB + MiB // 2, seed=1)
    fh, ino = await h.create(b"t", original)
    if commit_between:
        await h.fs.flush(fh)
    cut = MiB + 1234
    attr = await h.fs.setattr(ino, size=cut, fh=fh)
    assert attr.size == cut
    assert await h.read_all(fh, ino) == original[:cut]
    if commit_between:
        await h.fs.flush(fh)
    attr = await h.fs.setattr(ino, size=3 * MiB, fh=fh)
    assert attr.size == 3 * MiB
    expected = original[:cut] + bytes(3 * MiB - cut)
    assert await h.read_all(fh, ino) == expected
    await h.fs.flush(fh)
    await h.fs.release(fh)
    assert await h.cat(ino) == expected
    h.restart()
    assert await h.cat(await h.ino(b"t")) == expected


async def test_truncate_to_zero_and_rewrite(h: Harness) -> None:
    ino = await h.put(b"f", rand(MiB + 5))
    fh = await h.fs.open(ino, os.O_RDWR | os.O_TRUNC)
    assert await h.size(ino) == 0
    await h.fs.write(fh, 10, b"abc")
    await h.fs.flush(fh)
    await h.fs.release(fh)
    assert await h.cat(ino) == bytes(10) + b"abc"
    assert len(h.chunk_files()) == 1  # the two superseded chunks are gone


async def test_staged_writes_are_committed_on_flush_not_before(h: Harness) -> None:
    fh, ino = await h.create(b"f", b"hello")
    row = h.db.reader.by_ino(ino)
    assert row is not None and row.size == 0  # nothing committed yet
    assert (await h.fs.getattr(ino)).size == 5  # but this node already sees it
    await h.fs.flush(fh)
    row = h.db.reader.by_ino(ino)
    assert row is not None and row.size == 5
    await h.fs.release(fh)


async def test_uncommitted_writes_do_not_survive_a_restart_committed_ones_do(h: Harness) -> None:
    fh, _ = await h.create(b"f", b"committed")
    await h.fs.flush(fh)
    await h.fs.write(fh, 0, b"STAGED!!!")  # never flushed: a crash loses it
    h.restart()
    assert await h.cat(await h.ino(b"f")) == b"committed"


# --- unlinked but open --------------------------------------------------------------


async def test_unlinked_open_file_stays_readable_and_writable_until_release_and_forget(
    h: Harness,
) -> None:
    fh, ino = await h.create(b"victim", b"before unlink")
    await h.fs.flush(fh)
    chunks_at_unlink = h.chunk_files()
    await h.fs.unlink(ROOT_INO, b"victim")
    with pytest.raises(FsError) as exc:
        await h.fs.lookup(ROOT_INO, b"victim")
    assert errno_of(exc) == errno.ENOENT
    assert [name for name, _, _ in await h.fs.readdir(ROOT_INO, 0)] == []
    assert await h.read_all(fh, ino) == b"before unlink"
    await h.fs.write(fh, 13, b", and after" + rand(MiB, seed=7))
    await h.fs.flush(fh)
    assert (await h.fs.read(fh, 0, 24)) == b"before unlink, and after"
    attr = await h.fs.getattr(ino)
    assert attr.nlink == 0 and attr.size == 24 + MiB
    # a new file under the old name is a different inode and does not disturb the old one
    new_ino = await h.put(b"victim", b"new")
    assert new_ino != ino
    assert (await h.fs.read(fh, 0, 13)) == b"before unlink"
    await h.fs.release(fh)
    assert (await h.fs.getattr(ino)).size == 24 + MiB  # the kernel still holds a lookup
    await h.fs.forget([(ino, 1)])
    with pytest.raises(FsError) as exc:
        await h.fs.getattr(ino)
    assert errno_of(exc) == errno.ENOENT
    # what was written after the unlink is freed; the trash keeps the unlinked version
    after = h.chunk_files()
    assert chunks_at_unlink <= after
    assert len(after - chunks_at_unlink) == 1  # only "new", the file now at the name
    assert await h.cat(new_ino) == b"new"


async def test_unlink_of_a_file_nobody_holds_frees_the_inode(h: Harness) -> None:
    ino = await h.put(b"f", b"data")
    await h.fs.forget([(ino, 1)])
    await h.fs.unlink(ROOT_INO, b"f")
    with pytest.raises(FsError) as exc:
        await h.fs.getattr(ino)
    assert errno_of(exc) == errno.ENOENT


async def test_unlink_of_a_file_only_looked_up_keeps_no_hidden_copy(h: Harness) -> None:
    """``rm`` unlinks files the kernel has looked up but nobody has open: the kernel
    cannot reach them any more, so a hidden copy (written at unlink, deleted again at
    the forget) was two transactions' work for nothing on every file of an ``rm -rf``."""
    ino = await h.put(b"f", b"data")  # one lookup, no handle
    await h.fs.unlink(ROOT_INO, b"f")
    assert h.db.reader.hidden_inodes() == []
    await h.fs.forget([(ino, 1)])
    assert h.db.reader.by_ino(ino) is None
    assert [entry[1] for entry in h.db.reader.trash()] == [b"f"]  # still restorable


async def test_one_forget_frees_every_detached_inode_it_names_in_one_transaction(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    handles = [await h.create(name, b"x" * 10) for name in (b"a", b"b", b"c")]
    for name in (b"a", b"b", b"c"):
        await h.fs.unlink(ROOT_INO, name)  # open: each keeps a hidden copy
    for fh, _ in handles:
        await h.fs.flush(fh)
        await h.fs.release(fh)
    assert len(h.db.reader.hidden_inodes()) == 3
    transactions = _count_writes(h, monkeypatch)
    await h.fs.forget([(ino, 1) for _, ino in handles])
    assert h.db.reader.hidden_inodes() == []
    assert len(transactions) == 1


def _count_writes(h: Harness, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Spy on the database's write transactions; the list gets each one's ``small``."""
    seen: list[bool] = []
    real = h.db.write

    async def write(fn, *, small: bool = False):  # type: ignore[no-untyped-def]
        seen.append(small)
        return await real(fn, small=small)

    monkeypatch.setattr(h.db, "write", write)
    return seen


async def test_a_path_still_resolving_to_a_removed_file_gets_estale(h: Harness) -> None:
    """The kernel may still resolve a name to a file removed by unlink or rename-over
    (a lookup racing the removal, a readdirplus reply): ESTALE makes it look the path
    up again, where ENOENT would fail an ``open`` of a path that exists (atomic replace)."""
    old = await h.put(b"config", b"old")
    await h.put(b"config.tmp", b"new")
    await h.fs.rename(ROOT_INO, b"config.tmp", ROOT_INO, b"config", 0)
    with pytest.raises(FsError) as exc:
        await h.fs.open(old, os.O_RDONLY)
    assert errno_of(exc) == errno.ESTALE
    assert await h.cat(await h.ino(b"config")) == b"new"  # the retried lookup
    await h.fs.forget([(old, 1)])
    with pytest.raises(FsError) as exc:
        await h.fs.getattr(old)
    assert errno_of(exc) == errno.ENOENT  # forgotten: the kernel cannot ask any more


async def test_an_open_during_the_removal_of_its_file_waits_and_finds_it_gone(
    h: Harness,
) -> None:
    """An open that arrived while the unlink's transaction waited for the writer got a
    handle to an inode the transaction then took away: reads on a valid fd failed."""
    ino = await h.put(b"f", b"data")
    writer_free = threading.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.db.write, lambda t: writer_free.wait())  # the writer is busy
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(h.fs.unlink, ROOT_INO, b"f")
        await trio.testing.wait_all_tasks_blocked()
        opened: list[object] = []

        async def open_it() -> None:
            try:
                opened.append(await h.fs.open(ino, os.O_RDONLY))
            except FsError as exc:
                opened.append(exc.errno)

        nursery.start_soon(open_it)
        await trio.testing.wait_all_tasks_blocked()
        waited = opened == []
        writer_free.set()  # before any assertion: the nursery waits for that thread
    assert waited, "the open must wait for the removal"
    assert opened == [errno.ESTALE]


async def test_a_big_file_s_truncate_is_committed_by_the_writer_thread(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit runs on the event loop only for a small file: truncating a big one drops
    its whole block list, which would hold every request of the mount meanwhile."""
    ino = await h.put(b"big", rand(3 * MiB))
    transactions = _count_writes(h, monkeypatch)
    await h.fs.setattr(ino, size=0)
    assert transactions == [False]
    await h.put(b"small", b"tiny")
    assert transactions[-1] is True  # the commit of a one-block file


# --- rename ---------------------------------------------------------------------------


async def test_rename_over_a_file_replaces_it_and_keeps_the_source_inode(h: Harness) -> None:
    a = await h.put(b"a", b"AAAA")
    b = await h.put(b"b", b"BB")
    fh_b = await h.fs.open(b, os.O_RDONLY)
    await h.fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0)
    assert await h.ino(b"b") == a
    assert await h.cat(a) == b"AAAA"
    with pytest.raises(FsError) as exc:
        await h.fs.lookup(ROOT_INO, b"a")
    assert errno_of(exc) == errno.ENOENT
    # the replaced file is still open: its reader keeps its content
    assert await h.read_all(fh_b, b) == b"BB"
    assert (await h.fs.getattr(b)).nlink == 0
    await h.fs.release(fh_b)
    names = sorted(name for name, _, _ in await h.fs.readdir(ROOT_INO, 0))
    assert names == [b"b"]


async def test_rename_with_staged_writes_keeps_them(h: Harness) -> None:
    fh, ino = await h.create(b"tmp", b"unflushed content")
    await h.fs.rename(ROOT_INO, b"tmp", ROOT_INO, b"final", 0)
    await h.fs.flush(fh)
    await h.fs.release(fh)
    assert await h.ino(b"final") == ino
    assert await h.cat(ino) == b"unflushed content"
    h.restart()
    assert await h.cat(await h.ino(b"final")) == b"unflushed content"


async def test_rename_noreplace_and_exchange(h: Harness) -> None:
    await h.put(b"a", b"A")
    await h.put(b"b", b"B")
    with pytest.raises(FsError) as exc:
        await h.fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", RENAME_NOREPLACE)
    assert errno_of(exc) == errno.EEXIST
    with pytest.raises(FsError) as exc:
        await h.fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", RENAME_EXCHANGE)
    assert errno_of(exc) == errno.EINVAL
    # both still untouched
    assert await h.cat(await h.ino(b"a")) == b"A"
    assert await h.cat(await h.ino(b"b")) == b"B"
    # NOREPLACE onto a free name works
    await h.fs.rename(ROOT_INO, b"a", ROOT_INO, b"c", RENAME_NOREPLACE)
    assert await h.cat(await h.ino(b"c")) == b"A"


async def test_rename_directory_errors(h: Harness) -> None:
    d = (await h.fs.mkdir(ROOT_INO, b"d", 0o755, CALLER)).ino
    sub = (await h.fs.mkdir(d, b"sub", 0o755, CALLER)).ino
    await h.put(b"f", b"")
    with pytest.raises(FsError) as exc:
        await h.fs.rename(ROOT_INO, b"d", sub, b"inside", 0)
    assert errno_of(exc) == errno.EINVAL  # into its own subtree
    with pytest.raises(FsError) as exc:
        await h.fs.rename(ROOT_INO, b"d", ROOT_INO, b"f", 0)
    assert errno_of(exc) == errno.ENOTDIR
    with pytest.raises(FsError) as exc:
        await h.fs.rename(ROOT_INO, b"f", d, b"sub", 0)
    assert errno_of(exc) == errno.EISDIR
    await h.put(b"x", b"", parent=sub)
    e = (await h.fs.mkdir(ROOT_INO, b"e", 0o755, CALLER)).ino
    await h.put(b"y", b"", parent=e)
    with pytest.raises(FsError) as exc:
        await h.fs.rename(ROOT_INO, b"d", ROOT_INO, b"e", 0)
    assert errno_of(exc) == errno.ENOTEMPTY
    # a directory renamed keeps its own and its descendants' inodes
    x = await h.ino(b"x", parent=sub)
    await h.fs.rename(ROOT_INO, b"d", ROOT_INO, b"moved", 0)
    assert await h.ino(b"moved") == d
    assert await h.ino(b"sub", parent=d) == sub
    assert await h.ino(b"x", parent=sub) == x


# --- directories and names -------------------------------------------------------------


async def test_rmdir_of_a_non_empty_directory_is_enotempty(h: Harness) -> None:
    d = (await h.fs.mkdir(ROOT_INO, b"d", 0o755, CALLER)).ino
    await h.put(b"child", b"", parent=d)
    with pytest.raises(FsError) as exc:
        await h.fs.rmdir(ROOT_INO, b"d")
    assert errno_of(exc) == errno.ENOTEMPTY
    await h.fs.unlink(d, b"child")
    await h.fs.rmdir(ROOT_INO, b"d")
    with pytest.raises(FsError) as exc:
        await h.fs.lookup(ROOT_INO, b"d")
    assert errno_of(exc) == errno.ENOENT


async def test_unlink_and_rmdir_reject_the_wrong_kind(h: Harness) -> None:
    await h.fs.mkdir(ROOT_INO, b"d", 0o755, CALLER)
    await h.put(b"f", b"")
    with pytest.raises(FsError) as exc:
        await h.fs.unlink(ROOT_INO, b"d")
    assert errno_of(exc) == errno.EISDIR
    with pytest.raises(FsError) as exc:
        await h.fs.rmdir(ROOT_INO, b"f")
    assert errno_of(exc) == errno.ENOTDIR
    with pytest.raises(FsError) as exc:
        await h.fs.mkdir(ROOT_INO, b"f", 0o755, CALLER)
    assert errno_of(exc) == errno.EEXIST


async def test_non_utf8_names_get_eilseq(h: Harness) -> None:
    bad = b"caf\xe9"
    for attempt in (
        h.fs.create(ROOT_INO, bad, 0o644, os.O_RDWR, CALLER),
        h.fs.mkdir(ROOT_INO, bad, 0o755, CALLER),
        h.fs.symlink(ROOT_INO, bad, b"target", CALLER),
    ):
        with pytest.raises(FsError) as exc:
            await attempt
        assert errno_of(exc) == errno.EILSEQ
    await h.put(b"ok", b"")
    with pytest.raises(FsError) as exc:
        await h.fs.rename(ROOT_INO, b"ok", ROOT_INO, bad, 0)
    assert errno_of(exc) == errno.EILSEQ
    # valid UTF-8 names are stored byte-exact, without normalisation
    nfc, nfd = "café".encode(), "cafe\u0301".encode()
    a, b = await h.put(nfc, b"1"), await h.put(nfd, b"2")
    assert a != b
    assert await h.cat(await h.ino(nfc)) == b"1"
    assert await h.cat(await h.ino(nfd)) == b"2"


async def test_name_length_limit_is_255_bytes(h: Harness) -> None:
    ok = "é".encode() * 127 + b"x"  # 255 bytes
    assert len(ok) == 255
    await h.put(ok, b"fits")
    assert await h.cat(await h.ino(ok)) == b"fits"
    long = b"n" * 256
    for attempt in (
        h.fs.create(ROOT_INO, long, 0o644, os.O_RDWR, CALLER),
        h.fs.mkdir(ROOT_INO, long, 0o755, CALLER),
        h.fs.lookup(ROOT_INO, long),
        h.fs.rename(ROOT_INO, ok, ROOT_INO, long, 0),
    ):
        with pytest.raises(FsError) as exc:
            await attempt
        assert errno_of(exc) == errno.ENAMETOOLONG


async def test_hard_links_are_not_offered(h: Harness) -> None:
    ino = await h.put(b"f", b"x")
    assert not hasattr(h.fs, "link")
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await Operations(h.fs).link(ino, ROOT_INO, b"g", None)
    assert exc.value.errno == errno.EPERM
    with pytest.raises(FsError):
        await h.fs.lookup(ROOT_INO, b"g")


@pytest.mark.parametrize("kind", [stat.S_IFCHR, stat.S_IFBLK])
async def test_device_nodes_get_eperm(h: Harness, kind: int) -> None:
    with pytest.raises(FsError) as exc:
        await h.fs.mknod(ROOT_INO, b"dev", kind | 0o600, CALLER)
    assert errno_of(exc) == errno.EPERM
    with pytest.raises(FsError):
        await h.fs.lookup(ROOT_INO, b"dev")


async def test_fifo_socket_and_symlink_nodes(h: Harness) -> None:
    fifo = await h.fs.mknod(ROOT_INO, b"fifo", stat.S_IFIFO | 0o640, CALLER)
    assert stat.S_ISFIFO(fifo.mode) and stat.S_IMODE(fifo.mode) == 0o640
    sock = await h.fs.mknod(ROOT_INO, b"sock", stat.S_IFSOCK | 0o777, CALLER)
    assert stat.S_ISSOCK(sock.mode) and stat.S_IMODE(sock.mode) == 0o755  # umask 022
    link = await h.fs.symlink(ROOT_INO, b"link", b"some/where/else", CALLER)
    assert stat.S_ISLNK(link.mode) and link.size == len(b"some/where/else")
    assert await h.fs.readlink(link.ino) == b"some/where/else"


async def test_huge_offsets_get_efbig(h: Harness) -> None:
    fh, ino = await h.create(b"big")
    with pytest.raises(FsError) as exc:
        await h.fs.write(fh, MAX_FILE_SIZE, b"x")
    assert errno_of(exc) == errno.EFBIG
    with pytest.raises(FsError) as exc:
        await h.fs.setattr(ino, size=MAX_FILE_SIZE + 1)
    assert errno_of(exc) == errno.EFBIG
    # right below the limit is fine and stores a single chunk
    await h.fs.write(fh, MAX_FILE_SIZE - 1, b"z")
    await h.fs.flush(fh)
    assert await h.size(ino) == MAX_FILE_SIZE
    assert await h.fs.read(fh, MAX_FILE_SIZE - 3, 10) == b"\0\0z"
    await h.fs.release(fh)
    assert len(h.chunk_files()) == 1


async def test_umask_and_setgid_directories(h: Harness) -> None:
    f = await h.fs.mknod(ROOT_INO, b"f", stat.S_IFREG | 0o666, Caller(1, 2, 0o027))
    assert stat.S_IMODE(f.mode) == 0o640 and (f.uid, f.gid) == (1, 2)
    d = await h.fs.mkdir(ROOT_INO, b"d", 0o2775, Caller(0, 50, 0o002))
    assert stat.S_IMODE(d.mode) == 0o2775 and d.gid == 50
    inner = await h.fs.mkdir(d.ino, b"inner", 0o755, Caller(7, 8, 0o022))
    assert inner.gid == 50 and inner.mode & stat.S_ISGID
    g = await h.fs.mknod(d.ino, b"g", stat.S_IFREG | 0o644, Caller(7, 8, 0o022))
    assert g.gid == 50 and not g.mode & stat.S_ISGID


async def test_directory_link_counts(h: Harness) -> None:
    assert (await h.fs.getattr(ROOT_INO)).nlink == 2
    d = (await h.fs.mkdir(ROOT_INO, b"d", 0o755, CALLER)).ino
    assert (await h.fs.getattr(ROOT_INO)).nlink == 3
    await h.fs.mkdir(d, b"a", 0o755, CALLER)
    await h.fs.mkdir(d, b"b", 0o755, CALLER)
    await h.put(b"file", b"", parent=d)
    assert (await h.fs.getattr(d)).nlink == 4
    await h.fs.rmdir(d, b"a")
    assert (await h.fs.getattr(d)).nlink == 3


# --- chunks on disk ---------------------------------------------------------------------


@pytest.mark.parametrize("tail", [0, 100], ids=["aligned", "partial-last-chunk"])
async def test_appending_one_byte_stores_exactly_one_new_chunk(h: Harness, tail: int) -> None:
    data = rand(3 * MiB + tail, seed=3)
    ino = await h.put(b"multi", data)
    before = h.chunk_files()
    assert len(before) == 3 + (1 if tail else 0)
    fh = await h.fs.open(ino, os.O_WRONLY | os.O_APPEND)
    await h.fs.write(fh, 0, b"!")
    await h.fs.flush(fh)
    await h.fs.release(fh)
    after = h.chunk_files()
    assert len(after - before) == 1, "an append must store only the new last chunk"
    # the superseded last chunk (if any) is gone; the full chunks are untouched
    assert len(before - after) == (1 if tail else 0)
    assert len(after) == len(before) + (0 if tail else 1)
    assert await h.cat(ino) == data + b"!"


async def test_superseded_chunks_are_deleted_at_once(h: Harness) -> None:
    """Editors and databases rewrite and fsync often: old versions must not pile up."""
    fh, ino = await h.create(b"db")
    for round_ in range(6):
        await h.fs.write(fh, 0, rand(2 * MiB + 10, seed=round_))
        await (h.fs.fsync(fh) if round_ % 2 else h.fs.flush(fh))
        assert len(h.chunk_files()) == 3, f"round {round_}"
    await h.fs.release(fh)
    assert await h.cat(ino) == rand(2 * MiB + 10, seed=5)


async def test_identical_files_share_their_chunks(h: Harness) -> None:
    data = rand(2 * MiB + 17, seed=5)
    await h.put(b"one", data)
    first = h.chunk_files()
    await h.put(b"two", data)
    assert h.chunk_files() == first


async def test_no_plaintext_in_the_data_dir_while_writes_are_staged(h: Harness) -> None:
    marker = b"PLAINTEXT-MARKER-3f9c2a71"
    fh, ino = await h.create(b"secret")
    # scattered partial writes in several chunks: one stays in memory, the rest spill
    for i in range(6):
        await h.fs.write(fh, i * MiB + 4096 * i + 17, marker * 50)
    staging_files = [p for p in h.staging_dir.iterdir() if p.stat().st_size]
    assert staging_files, "expected the spilled chunks in an (encrypted) staging file"
    assert marker not in h.data_dir_bytes()
    # and a full chunk written (stored at once) is ciphertext too
    await h.fs.write(fh, 8 * MiB, marker * (MiB // len(marker)) + bytes(MiB % len(marker)))
    assert marker not in h.data_dir_bytes()
    assert (await h.fs.read(fh, 8 * MiB, len(marker))) == marker
    await h.fs.flush(fh)
    await h.fs.release(fh)
    assert marker not in h.data_dir_bytes()
    assert marker in await h.cat(ino)


async def test_a_corrupted_chunk_reads_as_an_error_never_wrong_data(
    h: Harness, no_unexpected_log: pytest.LogCaptureFixture
) -> None:
    data = rand(MiB + 50, seed=9)
    await h.put(b"f", data)
    h.restart()  # empty the decrypted-chunk cache
    ino = await h.ino(b"f")
    row = h.db.reader.by_ino(ino)
    assert row is not None
    block = h.db.reader.blocks(row.bl, 1, 1)[1]
    assert block.chunk_id is not None
    path = h.store.path(block.chunk_id)
    raw = bytearray(path.read_bytes())
    raw[20] ^= 0x04
    path.write_bytes(bytes(raw))
    fh = await h.fs.open(ino, os.O_RDONLY)
    assert await h.fs.read(fh, 0, 100) == data[:100]  # the intact chunk still reads
    with pytest.raises(CorruptChunk):
        await h.fs.read(fh, MiB, 10)
    # through the FUSE adapter the same read is EIO (and logged once)
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await Operations(h.fs).read(fh, MiB, 10)
    assert exc.value.errno == errno.EIO
    for record in no_unexpected_log.records:
        if "authentication failed" in record.getMessage():
            record.expected = True  # type: ignore[attr-defined]
    await h.fs.release(fh)


async def test_spilling_a_dirty_chunk_keeps_every_staged_range(h: Harness) -> None:
    """Regression: spilled range by range, a range sharing a 4 KiB staging block with an
    earlier one zeroed that one's bytes."""
    fh, ino = await h.create(b"f")
    await h.fs.write(fh, 0, b"A")
    await h.fs.write(fh, 4095, b"B" * 10)  # same chunk, same first 4 KiB staging block
    await h.fs.write(fh, MiB + 5, b"C")  # chunk 1 takes the memory buffer: chunk 0 spills
    expected = b"A" + bytes(4094) + b"B" * 10 + bytes(MiB + 5 - 4105) + b"C"
    assert await h.read_all(fh, ino) == expected
    await h.fs.flush(fh)
    await h.fs.release(fh)
    assert await h.cat(ino) == expected


async def test_completing_a_spilled_dirty_chunk(h: Harness) -> None:
    """Regression: a dirty chunk completed after it was spilled to the staging file
    failed an assertion that it was in memory (EIO through FUSE)."""
    fh, ino = await h.create(b"f")
    head = rand(1000, seed=1)
    rest = rand(MiB - 1000, seed=2)
    await h.fs.write(fh, 0, head)
    await h.fs.write(fh, MiB + 5, b"C")  # chunk 0 spills to the staging file
    await h.fs.write(fh, 1000, rest)  # ... and is now complete
    expected = head + rest + bytes(5) + b"C"
    assert await h.read_all(fh, ino) == expected
    await h.fs.flush(fh)
    await h.fs.release(fh)
    assert await h.cat(ino) == expected


# --- a model check of the content path ----------------------------------------------

_BOUNDARIES = [0, 1, 4095, 4096, MiB - 1, MiB, MiB + 1, 2 * MiB - 3, 2 * MiB, 3 * MiB + 7]
_offsets = st.one_of(st.sampled_from(_BOUNDARIES), st.integers(0, 3 * MiB + 100))
_lengths = st.one_of(st.sampled_from([1, 7, 4096, MiB, MiB + 1]), st.integers(1, 70_000))
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), _offsets, _lengths, st.integers(0, 255)),
        st.tuples(st.just("truncate"), _offsets),
        st.tuples(st.just("flush")),
        st.tuples(st.just("reopen")),
        st.tuples(st.just("check"), _offsets, _lengths),
    ),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=int(os.environ.get("SWARMFS_MODEL_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=_ops)
@example(ops=[("write", 0, 1, 0), ("write", 4095, MiB, 0)])  # the two regressions above
@example(ops=[("write", 0, 1, 0), ("write", MiB - 1, 7, 0), ("write", 0, MiB, 0)])
# A chunk both sealed and written over, cut and extended: the cut part must read as zeros.
@example(ops=[("write", 0, MiB, 0), ("write", 0, 1, 1), ("truncate", 1), ("truncate", 4095),
              ("check", 0, 7)])  # fmt: skip
async def test_random_io_matches_a_reference_bytearray(tmp_path_factory, ops) -> None:
    h = Harness(tmp_path_factory.mktemp("model"))
    try:
        ref = bytearray()
        fh, ino = await h.create(b"model")
        for op in ops:
            if op[0] == "write":
                _, off, n, seed = op
                data = rand(n, seed)
                await h.fs.write(fh, off, data)
                if off > len(ref):
                    ref.extend(bytes(off - len(ref)))
                ref[off : off + n] = data
            elif op[0] == "truncate":
                size = op[1]
                await h.fs.setattr(ino, size=size, fh=fh)
                del ref[size:]
                ref.extend(bytes(size - len(ref)))
            elif op[0] == "flush":
                await h.fs.flush(fh)
            elif op[0] == "reopen":
                await h.fs.flush(fh)
                await h.fs.release(fh)
                fh = await h.fs.open(ino, os.O_RDWR)
            else:
                _, off, n = op
                assert await h.fs.read(fh, off, n) == bytes(ref[off : off + n]), op
            assert await h.size(ino) == len(ref), op
        assert await h.read_all(fh, ino) == bytes(ref)
        await h.fs.flush(fh)
        await h.fs.release(fh)
        h.restart()
        assert await h.cat(await h.ino(b"model")) == bytes(ref)
    finally:
        h.close()


async def test_concurrent_writers_to_one_inode_are_serialised(h: Harness) -> None:
    fh1, ino = await h.create(b"shared")
    fh2 = await h.fs.open(ino, os.O_RDWR)
    pieces = {i: rand(50_000, seed=i) for i in range(40)}

    async def writer(fh: int, indexes: range) -> None:
        for i in indexes:
            await h.fs.write(fh, i * 50_000, pieces[i])
            if i % 7 == 0:
                await h.fs.flush(fh)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer, fh1, range(0, 40, 2))
        nursery.start_soon(writer, fh2, range(1, 40, 2))
    for fh in (fh1, fh2):
        await h.fs.flush(fh)
        await h.fs.release(fh)
    assert await h.cat(ino) == b"".join(pieces[i] for i in range(40))


async def test_a_chunk_rewritten_before_the_commit_is_neither_kept_nor_pushed(
    tmp_path: Path,
) -> None:
    """A full chunk is stored as soon as it fills; rewritten before close, it was still
    inventoried and queued for peers (garbage on every replica)."""
    db = Database(tmp_path / "db", "n" * 26)
    store = ChunkStore(tmp_path / "chunks")
    fs = Filesystem(db, ChunkIO(store, bytes(32)), tmp_path)
    first, second = os.urandom(CHUNK_SIZE), os.urandom(CHUNK_SIZE)
    fh, _ = await fs.create(ROOT_INO, b"f", 0o644, os.O_WRONLY, Caller())
    await fs.write(fh, 0, first)
    await fs.write(fh, 0, second)
    await fs.flush(fh)
    await fs.release(fh)
    stored = set(store.ids())
    assert len(stored) == 1, "only the chunk the committed version uses is on disk"
    queued = {c for c, _ in db.reader.push_batch(10)}
    assert queued == stored


def _newer_version_from_a_peer(h: Harness, path: bytes, size: int) -> Record:
    """A record a peer would send for ``path``: it supersedes ours (its chunk is not here)."""
    row = h.db.reader.by_path(path)
    assert row is not None
    peer = "peerpeerpeerpeerpeerpeer00"
    block = Block(b"\x07" * 32, b"\x08" * 32, size)
    version = row.version.bump(peer)
    return Record(path, Kind.FILE, 0o644, 0, 0, size, 1, version, peer, blocks=(block,))


@pytest.mark.parametrize("listing", [False, True], ids=["lookup", "readdir"])
async def test_an_entry_pairs_an_inode_with_its_own_attributes(h: Harness, listing: bool) -> None:
    """A remote version that commits between the statements reading a path's record and
    its inode gave the kernel the new inode with the old version's size (so a reader of
    the new content could stop short)."""
    await h.put(b"doc", b"old")
    remote = _newer_version_from_a_peer(h, b"doc", 11)
    reader = h.db.reader.conn

    def commit_in_between(statement: str) -> None:
        if statement.startswith("SELECT ino FROM inodes WHERE rid"):  # the second statement
            reader.set_trace_callback(None)
            h.db.write_sync(lambda t: t.apply_remote(remote))

    reader.set_trace_callback(commit_in_between)
    try:
        if listing:
            fh = await h.fs.opendir(ROOT_INO)
            ((name, attr, _),) = list(await h.fs.readdir(fh, 0))
            assert name == b"doc"
        else:
            attr = await h.fs.lookup(ROOT_INO, b"doc")
    finally:
        reader.set_trace_callback(None)
    current = h.db.reader.by_ino(attr.ino)
    assert current is not None
    assert attr.size == current.size


async def test_a_detached_inode_the_kernel_was_handed_meanwhile_is_not_freed(h: Harness) -> None:
    """GC sweeps detached inodes against a list of known ones taken before it awaits; a
    lookup answered meanwhile may hold one of them, which must then stay."""
    ino = await h.put(b"doc", b"old")  # the kernel holds one lookup of it
    remote = _newer_version_from_a_peer(h, b"doc", 3)
    h.db.write_sync(lambda t: t.apply_remote(remote))
    detached = h.db.reader.by_ino(ino)
    assert detached is not None and detached.hidden
    await h.fs._free_if_detached([ino])  # as a sweep whose list predates the lookup would
    assert h.db.reader.by_ino(ino) is not None
    await h.fs.forget([(ino, 1)])
    assert h.db.reader.by_ino(ino) is None, "freed once the kernel forgets it"


async def test_a_stored_chunk_s_plaintext_is_let_go_while_its_push_is_queued(h: Harness) -> None:
    """A background seal kept the 1 MiB plaintext while it waited to queue the push;
    with the metadata writer busy (a checkpoint during a 4 GiB ``dd``), 67 such waits
    held 67 MiB beyond the memory budget and node A's peak RSS reached 196 MiB."""
    pieces = [rand(MiB, seed) for seed in range(6)]
    queue_open, all_waiting = trio.Event(), trio.Event()
    waiting = 0

    async def queue_push_slowly(chunk_id: bytes, size: int) -> None:
        nonlocal waiting
        waiting += 1
        if waiting == len(pieces):
            all_waiting.set()
        await queue_open.wait()

    async with trio.open_nursery() as nursery:
        h.fs.nursery = nursery
        h.fs.on_chunk_stored = queue_push_slowly
        fh, _ = await h.create(b"big")
        for i in range(len(pieces)):  # no loop variable left holding a piece
            assert await h.fs.write(fh, i * MiB, pieces[i]) == MiB
        with trio.fail_after(10):
            await all_waiting.wait()
        held = [
            getattr(referrer, "__qualname__", type(referrer).__name__)
            for piece in pieces
            for referrer in gc.get_referrers(piece)
            if referrer is not pieces
        ]
        assert held == [], "plaintext still referenced while pushes wait to be queued"
        queue_open.set()
    await h.fs.flush(fh)
    await h.fs.release(fh)
    assert await h.cat(await h.ino(b"big")) == b"".join(pieces)


async def test_ftruncate_is_staged_until_flush_and_truncate_by_path_commits_at_once(
    h: Harness,
) -> None:
    """``split`` truncates each file it creates through its handle; that truncate was a
    commit of its own (a new version, announced to every peer) before the data's."""
    fh, ino = await h.create(b"f", rand(3 * 4096))
    await h.fs.flush(fh)
    committed = h.db.reader.by_ino(ino)
    assert committed is not None and committed.size == 3 * 4096

    attr = await h.fs.setattr(ino, size=4096, fh=fh)
    assert attr.size == (await h.fs.getattr(ino)).size == 4096
    assert await h.fs.read(fh, 0, 3 * 4096) == rand(3 * 4096)[:4096]
    row = h.db.reader.by_ino(ino)
    assert row is not None and row.size == 3 * 4096 and row.version == committed.version
    await h.fs.flush(fh)
    row = h.db.reader.by_ino(ino)
    assert row is not None and row.size == 4096 and row.version != committed.version

    await h.fs.setattr(ino, size=100)  # truncate(2): no handle will be flushed
    row = h.db.reader.by_ino(ino)
    assert row is not None and row.size == 100
    await h.fs.release(fh)
    assert await h.cat(ino) == rand(3 * 4096)[:100]
