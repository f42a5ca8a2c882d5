"""How real programs use a writable mount (kubo's writable-mount patterns, DESIGN.md §7).

Editors save by writing a temporary file, fsyncing it and renaming it over the
original; rsync does the same; databases fsync one handle and read through
another; logs append; readers keep reading a file that was replaced.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from mounted import SwarmMount, errno_of, run

pytestmark = pytest.mark.mounted

MiB = 1024 * 1024


def rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def run_threads(targets: list[Callable[[], None]], timeout: float = 60) -> None:
    """Run each target in a thread; re-raise the first failure; fail on a hang."""
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def go() -> None:
            try:
                fn()
            except BaseException as exc:  # handed to the main thread
                errors.append(exc)

        return go

    threads = [threading.Thread(target=wrap(t), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a worker thread hung on the mount"
    if errors:
        raise errors[0]


def test_editor_save_write_temp_fsync_rename_over(mnt: Path) -> None:
    doc = mnt / "doc.txt"
    doc.write_bytes(b"version 1\n" * 1000)
    old_ino = doc.stat().st_ino
    with open(doc, "rb") as reader:  # someone still has the old version open
        first = reader.read(10)
        tmp = mnt / ".doc.txt.tmp"
        with open(tmp, "wb") as out:
            out.write(b"version 2\n" * 500)
            out.flush()
            os.fsync(out.fileno())
        new_ino = tmp.stat().st_ino
        os.rename(tmp, doc)
        dir_fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        assert doc.read_bytes() == b"version 2\n" * 500
        assert doc.stat().st_ino == new_ino != old_ino
        assert not tmp.exists()
        # the replaced version stays readable through the handle opened before
        assert first + reader.read() == b"version 1\n" * 1000
        assert os.fstat(reader.fileno()).st_nlink == 0
    assert sorted(os.listdir(mnt)) == ["doc.txt"]


def test_real_vim_saves_a_file(mnt: Path, tmp_path: Path) -> None:
    if shutil.which("vim") is None:
        pytest.skip("vim is not installed")
    doc = mnt / "notes.txt"
    doc.write_text("alpha\nbeta\ngamma\n")
    os.chmod(doc, 0o640)
    env = {**os.environ, "HOME": str(tmp_path)}
    for backupcopy in ("no", "yes"):
        run(
            [
                "vim", "-u", "NONE", "-i", "NONE", "-es",
                "-c", f"set backupcopy={backupcopy} writebackup",
                "-c", f"%s/gamma/gamma {backupcopy}/",
                "-c", "wq",
                doc,
            ],
            env=env,
            timeout=60,
        )  # fmt: skip
    assert doc.read_text() == "alpha\nbeta\ngamma yes no\n"
    assert oct(doc.stat().st_mode & 0o777) == oct(0o640)
    assert sorted(os.listdir(mnt)) == ["notes.txt"]  # no swap or backup file left


@pytest.mark.parametrize("inplace", [False, True], ids=["temp-rename", "inplace"])
def test_rsync_updates_an_existing_file(mnt: Path, tmp_path: Path, inplace: bool) -> None:
    src = tmp_path / "data.bin"
    src.write_bytes(rand(3 * MiB, seed=1))
    os.utime(src, ns=(1_000_000_000 * 10**9, 1_000_000_000 * 10**9 + 5))
    opts = ["--inplace"] if inplace else []
    run(["rsync", "-a", *opts, src, mnt / "data.bin"])
    first_ino = (mnt / "data.bin").stat().st_ino
    # change the middle of the file only: the delta algorithm sends a partial update
    changed = bytearray(src.read_bytes())
    changed[MiB : MiB + 10] = b"0123456789"
    src.write_bytes(bytes(changed))
    os.utime(src, ns=(1_100_000_000 * 10**9, 1_100_000_000 * 10**9 + 7))
    run(["rsync", "-a", "--no-whole-file", *opts, src, mnt / "data.bin"])
    dest = mnt / "data.bin"
    assert dest.read_bytes() == bytes(changed)
    assert dest.stat().st_mtime_ns == 1_100_000_000 * 10**9 + 7
    assert (dest.stat().st_ino == first_ino) is inplace
    assert sorted(os.listdir(mnt)) == ["data.bin"]  # no .data.bin.XXXXXX left


def test_fsync_through_one_handle_is_seen_through_another(mnt: Path) -> None:
    path = mnt / "shared.db"
    writer = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    reader = os.open(path, os.O_RDONLY)
    try:
        payload = rand(MiB + 777, seed=2)
        os.pwrite(writer, payload, 0)
        os.fsync(writer)
        assert os.fstat(reader).st_size == len(payload)
        assert os.pread(reader, len(payload) + 10, 0) == payload
        # another process sees it too while the writer is still open
        out = subprocess.run(["cat", path], capture_output=True, check=True).stdout
        assert out == payload
        os.pwrite(writer, b"PATCH", 100)
        os.fdatasync(writer)
        assert os.pread(reader, 5, 100) == b"PATCH"
        late = os.open(path, os.O_RDONLY)  # a handle opened after the fsync
        try:
            assert os.pread(late, 5, 100) == b"PATCH"
        finally:
            os.close(late)
    finally:
        os.close(reader)
        os.close(writer)


def test_o_trunc_reopen(mnt: Path) -> None:
    path = mnt / "f"
    path.write_bytes(rand(3 * MiB, seed=3))
    watcher = os.open(path, os.O_RDONLY)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            assert os.fstat(watcher).st_size == 0
            assert path.stat().st_size == 0
            os.write(fd, b"short")
        finally:
            os.close(fd)
        assert path.read_bytes() == b"short"
        assert os.pread(watcher, 100, 0) == b"short"
        # O_TRUNC without any write leaves an empty file
        os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))
        assert path.read_bytes() == b""
        assert os.fstat(watcher).st_size == 0
    finally:
        os.close(watcher)
    # and the shell's '>' redirection
    run(["sh", "-c", f"printf 'one' > '{path}'; printf 'two' > '{path}'"])
    assert path.read_bytes() == b"two"


def test_unlinked_open_file_is_still_read_and_written(mnt: Path) -> None:
    path = mnt / "scratch"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"written before unlink;")
        os.unlink(path)
        assert not path.exists()
        assert os.listdir(mnt) == []
        os.write(fd, b" after unlink" + rand(2 * MiB, seed=4))
        os.fsync(fd)
        st = os.fstat(fd)
        assert st.st_nlink == 0 and st.st_size == 22 + 13 + 2 * MiB
        assert os.pread(fd, 35, 0) == b"written before unlink; after unlink"
        os.ftruncate(fd, 10)
        assert os.pread(fd, 100, 0) == b"written be"
        # a new file under the same name is independent of the open one
        path.write_bytes(b"new file")
        assert os.pread(fd, 100, 0) == b"written be"
        assert path.read_bytes() == b"new file"
    finally:
        os.close(fd)
    assert path.read_bytes() == b"new file"
    assert os.listdir(mnt) == ["scratch"]


def _ino(path: Path) -> str:
    return run(["stat", "-c", "%i", path]).stdout.strip()


def test_stat_inode_is_unchanged_across_rename(mnt: Path) -> None:
    (mnt / "d" / "sub").mkdir(parents=True)
    (mnt / "d" / "sub" / "f").write_text("x")
    (mnt / "g").write_text("y")
    (mnt / "other").mkdir()
    before = {p: _ino(mnt / p) for p in ("d", "d/sub", "d/sub/f", "g")}
    run(["mv", mnt / "g", mnt / "other" / "g2"])
    run(["mv", mnt / "d", mnt / "other" / "d2"])
    assert _ino(mnt / "other" / "g2") == before["g"]
    assert _ino(mnt / "other" / "d2") == before["d"]
    assert _ino(mnt / "other" / "d2" / "sub") == before["d/sub"]
    assert _ino(mnt / "other" / "d2" / "sub" / "f") == before["d/sub/f"]
    assert (mnt / "other" / "d2" / "sub" / "f").read_text() == "x"
    # and across a remount the numbers stay unique
    assert len(set(before.values())) == 4


def test_concurrent_writers_to_different_files(mnt: Path) -> None:
    contents = {f"w{i}": rand(2 * MiB + i * 1000, seed=10 + i) for i in range(4)}

    def writer(name: str) -> Callable[[], None]:
        def go() -> None:
            data = contents[name]
            with open(mnt / name, "wb") as f:
                for off in range(0, len(data), 64 * 1024):
                    f.write(data[off : off + 64 * 1024])
                    if off % (512 * 1024) == 0:
                        f.flush()
                        os.fsync(f.fileno())

        return go

    run_threads([writer(n) for n in contents])
    for name, data in contents.items():
        assert (mnt / name).read_bytes() == data, name


def test_concurrent_readers_of_one_file(mnt: Path) -> None:
    data = rand(5 * MiB + 3, seed=20)
    (mnt / "big").write_bytes(data)

    def reader(seed: int) -> Callable[[], None]:
        def go() -> None:
            rng = random.Random(seed)
            fd = os.open(mnt / "big", os.O_RDONLY)
            try:
                for _ in range(60):
                    off = rng.randrange(len(data))
                    n = rng.choice([1, 4096, 100_000, MiB + 1])
                    assert os.pread(fd, n, off) == data[off : off + n]
                assert os.read(fd, len(data) + 1) == data  # sequential, from 0
            finally:
                os.close(fd)

        return go

    run_threads([reader(s) for s in range(6)])


def test_concurrent_reader_and_writer_of_one_file(mnt: Path) -> None:
    path = mnt / "log"
    path.write_bytes(b"")
    lines = [f"line {i:05d}\n".encode() for i in range(2000)]

    def write() -> None:
        with open(path, "ab") as f:
            for line in lines:
                f.write(line)
                f.flush()

    def read() -> None:
        seen = b""
        fd = os.open(path, os.O_RDONLY)
        try:
            for _ in range(200):
                seen = os.pread(fd, 10 * MiB, 0)
                # whatever is visible is a prefix of what is being written
                assert b"".join(lines).startswith(seen[: len(seen) - len(seen) % 11])
        finally:
            os.close(fd)

    run_threads([write, read])
    assert path.read_bytes() == b"".join(lines)


def test_o_append_from_two_handles(mnt: Path) -> None:
    path = mnt / "app.log"
    a = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
    b = os.open(path, os.O_WRONLY | os.O_APPEND)
    expected = b""
    try:
        for i in range(50):
            fd = a if i % 2 == 0 else b
            line = f"{'a' if fd == a else 'b'} {i}\n".encode() * (1 + i % 3)
            os.write(fd, line)
            expected += line
            if i == 25:
                os.fsync(a)
        assert os.fstat(a).st_size == len(expected)
    finally:
        os.close(a)
        os.close(b)
    for i in range(5):
        run(["sh", "-c", f"echo shell {i} >> '{path}'"])
        expected += f"shell {i}\n".encode()
    assert path.read_bytes() == expected


def test_shared_mmap_writes_are_committed(mount_factory: Callable[..., SwarmMount]) -> None:
    node = mount_factory()
    path = node.mountpoint / "mapped"
    path.write_bytes(bytes(2 * MiB))
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
        try:
            m[100:105] = b"HELLO"
            m[MiB + 1 : MiB + 6] = b"WORLD"
            m.flush()
        finally:
            m.close()
    expected = bytearray(2 * MiB)
    expected[100:105], expected[MiB + 1 : MiB + 6] = b"HELLO", b"WORLD"
    assert path.read_bytes() == bytes(expected)
    node.umount()  # the page cache is gone after this: what is read next was committed
    node.mount()
    assert path.read_bytes() == bytes(expected)


def test_unaligned_o_direct_io_works_or_fails_with_an_errno(mnt: Path) -> None:
    path = mnt / "direct"
    path.write_bytes(b"x" * 10_000)
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError as exc:
        assert exc.errno in (errno.EINVAL, errno.EOPNOTSUPP), exc
        fd = None
    if fd is not None:
        try:
            outcome = errno_of(lambda: os.pwrite(fd, b"unaligned!", 3))
            assert outcome in (0, errno.EINVAL), outcome
            read = errno_of(lambda: os.pread(fd, 777, 5))
            assert read in (0, errno.EINVAL), read
            if outcome == 0:
                assert os.pread(fd, 10, 3) == b"unaligned!"
        finally:
            os.close(fd)
        expected = b"xxx" + (b"unaligned!" if outcome == 0 else b"x" * 10) + b"x" * 9987
        assert path.read_bytes() == expected
    assert path.stat().st_size == 10_000
    assert os.listdir(mnt) == ["direct"]  # the mount is alive and sane


@pytest.mark.slow
def test_a_directory_of_100_000_entries_lists_completely(mnt: Path) -> None:
    big = mnt / "big"
    big.mkdir()
    count = 100_000
    names = [f"entry-{i:06d}-{'x' * (i % 40)}" for i in range(count)]
    for name in names:
        os.mknod(big / name)
    listed = os.listdir(big)
    assert len(listed) == count
    assert len(set(listed)) == count
    assert set(listed) == set(names)
    # a second listing through a fresh handle agrees, via scandir with types
    with os.scandir(big) as it:
        kinds = {e.name: e.is_file(follow_symlinks=False) for e in it}
    assert len(kinds) == count and all(kinds.values())
    assert (big / names[-1]).exists() and (big / names[0]).exists()


def test_readers_of_a_file_replaced_by_rename_never_miss_it(mnt: Path) -> None:
    """Atomic replace (write a temporary file, rename it over) while others open the
    path: the name always exists, so every open must succeed and read one whole
    version. The kernel may resolve the name to the replaced inode just before the
    rename; that inode must then send it to look again, not report ENOENT."""
    config = mnt / "config"
    versions = [f"version {i}\n".encode() * 100 for i in range(150)]
    config.write_bytes(versions[0])
    done = threading.Event()
    seen: set[bytes] = set()

    def replace_repeatedly() -> None:
        try:
            for i, content in enumerate(versions[1:], 1):
                tmp = mnt / f"config.tmp{i}"
                tmp.write_bytes(content)
                os.rename(tmp, config)
        finally:
            done.set()

    def read_repeatedly() -> None:
        while not done.is_set():
            seen.add(config.read_bytes())

    run_threads([replace_repeatedly, read_repeatedly, read_repeatedly])
    assert seen <= set(versions) and len(seen) > 1
    assert config.read_bytes() == versions[-1]
