"""One node, really mounted, driven by ordinary tools (DESIGN.md §7, S3QL ``t4_fuse``).

Most tests share one mount per module (each in a directory of its own); the
ones that unmount, remount or kill the node get a mount of their own.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import shutil
import sqlite3
import stat
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from mounted import (
    SwarmMount,
    errno_of,
    fuse_unavailable,
    make_tree,
    run,
    tree_snapshot,
    wait_until,
)

from swarmfs.fuse.mount import READ_AHEAD_KIB, _mount_device

pytestmark = pytest.mark.mounted

MiB = 1024 * 1024


def rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def no_match_in(directory: Path, marker: bytes) -> bool:
    """grep the whole directory (binary files too) for ``marker``; True if absent."""
    result = subprocess.run(
        ["grep", "-r", "-a", "-F", "-l", "-e", marker.decode(), str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 1


# --- coreutils ---------------------------------------------------------------------


def test_cp_cat_mv_rm(mnt: Path, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    data = rand(3 * MiB + 333)
    src.write_bytes(data)
    run(["cp", src, mnt / "a.bin"])
    assert subprocess.run(["cat", mnt / "a.bin"], capture_output=True, check=True).stdout == data
    run(["cmp", src, mnt / "a.bin"])
    run(["mv", mnt / "a.bin", mnt / "b.bin"])
    assert not (mnt / "a.bin").exists()
    assert (mnt / "b.bin").read_bytes() == data
    run(["cp", mnt / "b.bin", tmp_path / "back.bin"])
    assert (tmp_path / "back.bin").read_bytes() == data
    run(["rm", mnt / "b.bin"])
    assert sorted(os.listdir(mnt)) == []


def test_cp_over_an_existing_larger_file_truncates_it(mnt: Path, tmp_path: Path) -> None:
    (mnt / "f").write_bytes(rand(2 * MiB, seed=1))
    small = tmp_path / "small"
    small.write_bytes(b"tiny")
    run(["cp", small, mnt / "f"])
    assert (mnt / "f").read_bytes() == b"tiny"
    assert (mnt / "f").stat().st_size == 4


def test_mkdir_rmdir(mnt: Path) -> None:
    run(["mkdir", "-p", mnt / "x" / "y" / "z"])
    assert (mnt / "x" / "y" / "z").is_dir()
    result = subprocess.run(["rmdir", mnt / "x"], capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "Directory not empty" in result.stderr
    assert errno_of(lambda: os.rmdir(mnt / "x")) == errno.ENOTEMPTY
    run(["rmdir", mnt / "x" / "y" / "z", mnt / "x" / "y", mnt / "x"])
    assert not (mnt / "x").exists()
    assert errno_of(lambda: os.mkdir(mnt / "missing" / "child")) == errno.ENOENT


def test_truncate(mnt: Path) -> None:
    f = mnt / "t"
    f.write_bytes(b"0123456789" * 1000)
    run(["truncate", "-s", "5M", f])
    assert f.stat().st_size == 5 * MiB
    data = f.read_bytes()
    assert data[:10_000] == b"0123456789" * 1000 and data[10_000:] == bytes(5 * MiB - 10_000)
    run(["truncate", "-s", "15", f])
    assert f.read_bytes() == b"012345678901234"
    run(["truncate", "-s", "+5", f])
    assert f.read_bytes() == b"012345678901234" + bytes(5)
    run(["truncate", "-s", "0", f])
    assert f.read_bytes() == b""


def test_symlinks(mnt: Path) -> None:
    (mnt / "target.txt").write_text("pointed at")
    run(["ln", "-s", "target.txt", mnt / "rel"])
    long_target = "/" + "/".join(["segment"] * 100)
    run(["ln", "-s", long_target, mnt / "abs"])
    assert os.readlink(mnt / "rel") == "target.txt"
    assert (mnt / "rel").read_text() == "pointed at"
    assert os.readlink(mnt / "abs") == long_target
    # a symlink's size is its target's length
    assert os.lstat(mnt / "rel").st_size == len("target.txt")
    assert os.lstat(mnt / "abs").st_size == len(long_target)
    assert stat.S_ISLNK(os.lstat(mnt / "abs").st_mode)
    run(["rm", mnt / "rel"])
    assert (mnt / "target.txt").exists()


def test_hard_links_are_refused_with_eperm(mnt: Path) -> None:
    (mnt / "f").write_text("x")
    result = subprocess.run(["ln", mnt / "f", mnt / "g"], capture_output=True, text=True)
    assert result.returncode != 0 and "Operation not permitted" in result.stderr
    assert errno_of(lambda: os.link(mnt / "f", mnt / "g")) == errno.EPERM
    assert not (mnt / "g").exists()
    assert os.stat(mnt / "f").st_nlink == 1


def test_touch_d_sets_times(mnt: Path) -> None:
    f = mnt / "stamped"
    run(["touch", "-d", "2001-02-03 04:05:06.789 UTC", f])
    st = f.stat()
    assert st.st_mtime_ns == 981173106_789000000
    assert st.st_atime_ns == 981173106_789000000
    assert st.st_size == 0
    run(["touch", "-m", "-d", "@1234567890.5", f])
    assert f.stat().st_mtime_ns == 1234567890_500000000
    os.utime(f, ns=(5, 1_500_000_000_123_456_789))
    assert f.stat().st_mtime_ns == 1_500_000_000_123_456_789
    # a directory's mtime too
    (mnt / "d").mkdir()
    run(["touch", "-d", "@1000000000", mnt / "d"])
    assert (mnt / "d").stat().st_mtime_ns == 1_000_000_000 * 10**9


def test_write_updates_mtime(mnt: Path) -> None:
    f = mnt / "f"
    f.write_text("a")
    os.utime(f, ns=(0, 10**9))
    with open(f, "a") as out:
        out.write("b")
    assert f.stat().st_mtime_ns > 10**9


def test_chmod(mnt: Path) -> None:
    f = mnt / "f"
    f.write_text("x")
    for mode in ("0640", "0600", "0755", "4755", "2750", "1777", "0000"):
        run(["chmod", mode, f])
        assert oct(stat.S_IMODE(f.stat().st_mode)) == oct(int(mode, 8))
        assert stat.S_ISREG(f.stat().st_mode)
    run(["chmod", "u+rw,g+r,o-rwx", f])
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    (mnt / "d").mkdir()
    run(["chmod", "0700", mnt / "d"])
    assert stat.S_IMODE((mnt / "d").stat().st_mode) == 0o700
    assert stat.S_ISDIR((mnt / "d").stat().st_mode)


def test_chown(mnt: Path) -> None:
    f = mnt / "f"
    f.write_text("x")
    run(["chmod", "6755", f])
    run(["chown", "1234:5678", f])
    st = f.stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    # chown clears setuid/setgid on a regular file
    assert stat.S_IMODE(st.st_mode) == 0o755
    (mnt / "d").mkdir()
    run(["chown", "-h", "42:43", mnt / "d"])
    assert ((mnt / "d").stat().st_uid, (mnt / "d").stat().st_gid) == (42, 43)
    os.symlink("f", mnt / "l")
    os.lchown(mnt / "l", 7, 8)
    assert (os.lstat(mnt / "l").st_uid, os.lstat(mnt / "l").st_gid) == (7, 8)
    assert (f.stat().st_uid, f.stat().st_gid) == (1234, 5678)


def test_dd_with_seek_leaves_holes(mnt: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(rand(64 * 1024, seed=2))
    f = mnt / "dd.img"
    ref = bytearray()

    def dd(seek: int, count: int, bs: int = 4096, notrunc: bool = True) -> None:
        args = ["dd", f"if={src}", f"of={f}", f"bs={bs}", f"seek={seek}", f"count={count}"]
        run([*args, "status=none", *(["conv=notrunc"] if notrunc else [])])
        off, data = seek * bs, src.read_bytes()[: count * bs]
        if not notrunc:
            del ref[off:]
        ref.extend(bytes(max(0, off - len(ref))))
        ref[off : off + len(data)] = data

    dd(seek=300, count=2)  # a 1.2 MB hole, then 8 KiB
    assert f.stat().st_size == 302 * 4096
    dd(seek=10, count=3)  # inside the hole
    dd(seek=255, count=2)  # across the 1 MiB chunk boundary (256 * 4096)
    dd(seek=700, count=16, bs=4096)
    assert f.read_bytes() == bytes(ref)
    dd(seek=5, count=1, notrunc=False)  # without notrunc: truncated after the write
    assert f.stat().st_size == 6 * 4096
    assert f.read_bytes() == bytes(ref)


def test_python_random_offset_io_matches_a_reference(mnt: Path) -> None:
    rng = random.Random(1234)
    f = mnt / "random.bin"
    ref = bytearray()
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for step in range(300):
            roll = rng.random()
            if roll < 0.6:
                off = rng.choice([rng.randrange(4 * MiB), rng.randrange(8) * MiB - 1])
                off = max(off, 0)
                data = rng.randbytes(rng.choice([1, 100, 4096, 70_000, MiB]))
                assert os.pwrite(fd, data, off) == len(data)
                ref.extend(bytes(max(0, off - len(ref))))
                ref[off : off + len(data)] = data
            elif roll < 0.7:
                size = rng.randrange(5 * MiB)
                os.ftruncate(fd, size)
                del ref[size:]
                ref.extend(bytes(size - len(ref)))
            elif roll < 0.8:
                os.fsync(fd)
            elif roll < 0.85:
                os.close(fd)
                fd = os.open(f, os.O_RDWR)
            else:
                off = rng.randrange(len(ref) + 10)
                n = rng.choice([1, 5000, MiB + 3])
                assert os.pread(fd, n, off) == bytes(ref[off : off + n]), f"step {step}"
            assert os.fstat(fd).st_size == len(ref), f"step {step}"
    finally:
        os.close(fd)
    assert f.read_bytes() == bytes(ref)


def test_statfs_reports_name_max_255(mnt: Path) -> None:
    st = os.statvfs(mnt)
    assert st.f_namemax == 255
    assert st.f_blocks > 0 and st.f_bsize > 0
    result = run(["stat", "-f", "-c", "%l %T", mnt])
    assert result.stdout.split()[0] == "255"


def _bdi(path: Path) -> Path:
    device = os.stat(path).st_dev
    return Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}")


def test_the_kernel_reads_a_whole_chunk_ahead(mnt: Path) -> None:
    """FUSE mounts get 128 KiB of read-ahead; a chunk's worth doubles cold reads."""
    assert (_bdi(mnt) / "read_ahead_kb").read_text().strip() == str(READ_AHEAD_KIB)


def test_a_mount_is_found_in_mountinfo_by_its_escaped_path(tmp_path: Path) -> None:
    """mountinfo writes a space, tab or backslash in a path as an octal escape."""
    target = tmp_path / "a space\\and\ta backslash"
    target.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", target])
    try:
        device = os.stat(target).st_dev
        assert _mount_device(target) == f"{os.major(device)}:{os.minor(device)}"
    finally:
        run(["umount", target])


def test_names_mounted(mnt: Path) -> None:
    ok = "é" * 127 + "x"
    (mnt / ok).write_text("fits")
    assert (mnt / ok).read_text() == "fits"
    assert errno_of(lambda: (mnt / ("n" * 256)).write_text("x")) == errno.ENAMETOOLONG
    bad = os.fsencode(mnt) + b"/caf\xe9"
    assert errno_of(lambda: os.close(os.open(bad, os.O_CREAT | os.O_WRONLY, 0o644))) == (
        errno.EILSEQ
    )
    assert errno_of(lambda: os.mkdir(bad)) == errno.EILSEQ
    assert sorted(os.listdir(mnt)) == [ok]


def test_umask_and_mode_on_create_and_mkdir(mnt: Path) -> None:
    old = os.umask(0o027)
    try:
        fd = os.open(mnt / "f", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
        os.mkdir(mnt / "d", 0o777)
        os.mkfifo(mnt / "p", 0o666)
        os.umask(0)
        fd = os.open(mnt / "g", os.O_CREAT | os.O_WRONLY, 0o604)
        os.close(fd)
        os.mkdir(mnt / "e", 0o751)
    finally:
        os.umask(old)
    assert stat.S_IMODE((mnt / "f").stat().st_mode) == 0o640
    assert stat.S_IMODE((mnt / "d").stat().st_mode) == 0o750
    assert stat.S_IMODE((mnt / "p").stat().st_mode) == 0o640
    assert stat.S_IMODE((mnt / "g").stat().st_mode) == 0o604
    assert stat.S_IMODE((mnt / "e").stat().st_mode) == 0o751


def test_directory_link_counts(mnt: Path) -> None:
    assert (mnt).stat().st_nlink == 2
    for name in ("a", "b", "c"):
        (mnt / name).mkdir()
    (mnt / "file").write_text("x")
    os.symlink("a", mnt / "link")
    assert (mnt).stat().st_nlink == 5
    (mnt / "a" / "sub").mkdir()
    assert (mnt / "a").stat().st_nlink == 3
    assert (mnt / "b").stat().st_nlink == 2
    os.rmdir(mnt / "c")
    assert (mnt).stat().st_nlink == 4
    os.rename(mnt / "b", mnt / "a" / "b")
    assert (mnt).stat().st_nlink == 3
    assert (mnt / "a").stat().st_nlink == 4
    assert (mnt / "file").stat().st_nlink == 1


def test_mkfifo_carries_data(mnt: Path) -> None:
    fifo = mnt / "pipe"
    os.mkfifo(fifo, 0o600)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    payload = rand(10_000, seed=3)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with open(fifo, "wb") as w:
                w.write(payload)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    with open(fifo, "rb") as r:
        got = r.read()
    t.join(timeout=10)
    assert not t.is_alive() and not errors
    assert got == payload
    assert fifo.stat().st_size == 0


def _renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        pytest.skip("this libc has no renameat2")
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def test_rename_flags_through_the_kernel(mnt: Path) -> None:
    (mnt / "a").write_text("A")
    (mnt / "b").write_text("B")
    assert errno_of(lambda: _renameat2(mnt / "a", mnt / "b", 1)) == errno.EEXIST  # NOREPLACE
    assert errno_of(lambda: _renameat2(mnt / "a", mnt / "b", 2)) == errno.EINVAL  # EXCHANGE
    assert (mnt / "a").read_text() == "A" and (mnt / "b").read_text() == "B"
    _renameat2(mnt / "a", mnt / "c", 1)
    assert (mnt / "c").read_text() == "A" and not (mnt / "a").exists()


# --- bigger tools -------------------------------------------------------------------


def test_rsync_a_tree_in_and_diff(mnt: Path, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    make_tree(src)
    run(["rsync", "-a", f"{src}/", f"{mnt / 'tree'}/"])
    run(["diff", "-r", "--no-dereference", src, mnt / "tree"])
    assert tree_snapshot(mnt / "tree") == tree_snapshot(src)
    # a second run changes nothing and a modified file is brought up to date
    (src / "small.txt").write_bytes(b"changed\n")
    run(["rsync", "-a", "--delete", f"{src}/", f"{mnt / 'tree'}/"])
    assert tree_snapshot(mnt / "tree") == tree_snapshot(src)


def test_tar_a_tree_in_and_back_out(mnt: Path, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    make_tree(src, seed=1)
    archive = tmp_path / "tree.tar"
    run(["tar", "--format=posix", "-C", src, "-cf", archive, "."])  # pax: ns mtimes
    (mnt / "untarred").mkdir()
    run(["tar", "-C", mnt / "untarred", "-xpf", archive])
    run(["diff", "-r", "--no-dereference", src, mnt / "untarred"])
    back = tmp_path / "back"
    back.mkdir()
    with subprocess.Popen(
        ["tar", "--format=posix", "-C", mnt / "untarred", "-cf", "-", "."], stdout=subprocess.PIPE
    ) as out:
        run(["tar", "-C", back, "-xpf", "-"], stdin=out.stdout)
    assert out.returncode == 0
    assert tree_snapshot(back) == tree_snapshot(src)
    assert tree_snapshot(mnt / "untarred") == tree_snapshot(src)


def test_git_repository_inside_the_mount(mnt: Path) -> None:
    repo = mnt / "repo"
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(mnt),
    }

    def git(*args: str) -> str:
        return run(["git", "-C", repo, *args], env=env).stdout

    run(["git", "init", "-q", "-b", "main", repo], env=env)
    for i in range(3):
        (repo / f"file{i}.txt").write_text(f"content {i}\n" * (i + 1))
        (repo / "shared.txt").write_text(f"version {i}\n")
        (repo / "sub").mkdir(exist_ok=True)
        (repo / "sub" / "bin").write_bytes(rand(200_000, seed=i))
        git("add", "-A")
        git("commit", "-q", "-m", f"commit {i}")
    git("mv", "file0.txt", "renamed.txt")
    git("commit", "-q", "-m", "rename")
    assert git("log", "--format=%s").split("\n")[:4] == [
        "rename",
        "commit 2",
        "commit 1",
        "commit 0",
    ]
    assert git("status", "--porcelain") == ""
    git("fsck", "--full", "--strict")
    git("gc", "-q")
    git("fsck", "--full", "--strict")
    assert git("show", "HEAD~1:shared.txt") == "version 2\n"
    assert git("show", "HEAD~3:shared.txt") == "version 0\n"
    # a clone out of the mount is intact too
    clone = mnt.parent / (mnt.name + "-clone")
    try:
        run(["git", "clone", "-q", repo, clone], env=env)
        assert (clone / "renamed.txt").read_text() == "content 0\n"
    finally:
        shutil.rmtree(clone, ignore_errors=True)


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_sqlite_database_on_the_mount(mnt: Path, journal: str) -> None:
    path = mnt / "test.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert conn.execute(f"PRAGMA journal_mode={journal}").fetchone()[0] == journal
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, blob BLOB)")
        rng = random.Random(5)
        for batch in range(20):  # 1 000 inserts in 20 transactions, each synced
            conn.execute("BEGIN")
            for i in range(50):
                n = batch * 50 + i
                conn.execute(
                    "INSERT INTO t (id, name, blob) VALUES (?, ?, ?)",
                    (n, f"row {n}", rng.randbytes(rng.randrange(10, 3000))),
                )
            conn.execute("COMMIT")
        conn.execute("CREATE INDEX t_name ON t(name)")
        conn.execute("DELETE FROM t WHERE id % 10 = 0")
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    result = run(["sqlite3", path, "PRAGMA integrity_check; SELECT count(*) FROM t;"])
    assert result.stdout.split() == ["ok", "900"]


# --- what lands in the data dir ------------------------------------------------------


def test_data_dir_holds_no_plaintext(mnt: Path, shared_mount: SwarmMount, tmp_path: Path) -> None:
    marker = b"UNIQUE-PLAINTEXT-MARKER-d41d8cd98f"
    src = tmp_path / "secret.txt"
    src.write_bytes((marker + b"\n") * 40_000)  # ~1.4 MB: a full chunk and a partial one
    run(["cp", src, mnt / "secret.txt"])
    assert (mnt / "secret.txt").read_bytes() == src.read_bytes()
    assert no_match_in(shared_mount.data_dir, marker)
    # still open, with staged writes: partial chunks scattered over several chunks
    fd = os.open(mnt / "open.txt", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        for i in range(5):
            os.pwrite(fd, marker * 10, i * MiB + 999 * i)
        assert os.pread(fd, len(marker), 4 * MiB + 999 * 4) == marker
        assert no_match_in(shared_mount.data_dir, marker)
        os.fsync(fd)
        assert no_match_in(shared_mount.data_dir, marker)
    finally:
        os.close(fd)
    assert no_match_in(shared_mount.data_dir, marker)
    assert not no_match_in(mnt, marker)  # the grep itself does find it where it should


# --- unmount, remount, crash -----------------------------------------------------------


def _populate(root: Path) -> None:
    make_tree(root / "tree", seed=7)
    (root / "exec").write_bytes(b"#!/bin/sh\n")
    (root / "exec").chmod(0o751)
    os.mkfifo(root / "fifo", 0o620)
    os.chown(root / "exec", 321, 654)
    os.utime(root / "exec", ns=(10**18, 1_600_000_000_000_000_001))
    # scattered small writes: staged, spilled, then committed (the page cache can hide a
    # bad commit until the remount)
    fd = os.open(root / "scattered", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        for i, off in enumerate([0, 4095, MiB + 5, 3, 2 * MiB - 1, 8190, MiB + 4096]):
            os.pwrite(fd, bytes([65 + i]) * 7, off)
        os.pwrite(fd, rand(MiB - 20_000, seed=4), 20_000)  # completes chunk 0 late
    finally:
        os.close(fd)


def test_unmount_and_remount_shows_everything(
    mount_factory: Callable[..., SwarmMount],
) -> None:
    node = mount_factory()
    _populate(node.mountpoint)
    before = tree_snapshot(node.mountpoint)
    owner = (node.mountpoint / "exec").stat()
    node.umount()
    assert not node.is_mounted() and os.listdir(node.mountpoint) == []
    node.mount()
    assert tree_snapshot(node.mountpoint) == before
    again = (node.mountpoint / "exec").stat()
    assert (again.st_uid, again.st_gid, again.st_mode) == (
        owner.st_uid,
        owner.st_gid,
        owner.st_mode,
    )
    assert stat.S_ISFIFO((node.mountpoint / "fifo").lstat().st_mode)
    # and it is writable again after the remount
    (node.mountpoint / "tree" / "small.txt").write_text("after remount")
    assert (node.mountpoint / "tree" / "small.txt").read_text() == "after remount"


def test_kill_9_right_after_cp_keeps_the_file(
    mount_factory: Callable[..., SwarmMount], tmp_path: Path
) -> None:
    node = mount_factory()
    src = tmp_path / "payload"
    src.write_bytes(rand(2 * MiB + 4321, seed=11))
    run(["cp", src, node.mountpoint / "copied"])
    (node.mountpoint / "small").write_bytes(b"closed before the crash")
    fd = os.open(node.mountpoint / "synced", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"fsynced")
    os.fsync(fd)
    node.kill9()  # while this file is still open
    # closing now can only report the dead connection
    assert errno_of(lambda: os.close(fd)) in (0, errno.ECONNABORTED, errno.ENOTCONN)
    wait_until(
        lambda: errno_of(lambda: os.stat(node.mountpoint)) == errno.ENOTCONN,
        10,
        "the mount to be dead",
    )
    node.expect_log(r"cleared .*(dead|crash)")
    node.mount()  # clears the dead mount by itself
    assert (node.mountpoint / "copied").read_bytes() == src.read_bytes()
    assert (node.mountpoint / "small").read_bytes() == b"closed before the crash"
    assert (node.mountpoint / "synced").read_bytes() == b"fsynced"
    # no staging or partial chunk of the dead process survives the restart
    staging = node.data_dir / "staging"
    assert not staging.exists() or [p for p in staging.iterdir() if p.stat().st_size] == []
    assert list((node.data_dir / "chunks" / "tmp").iterdir()) == []


# --- more tools and system calls ---------------------------------------------------------


def test_cp_p_and_cp_a_preserve_times_and_modes(mnt: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, seed=3)
    run(["cp", "-a", src, mnt / "copy"])
    assert tree_snapshot(mnt / "copy") == tree_snapshot(src)
    single = tmp_path / "single"
    single.write_bytes(rand(MiB + 1, seed=4))
    single.chmod(0o604)
    os.utime(single, ns=(1_234_567_890_123_456_789, 1_111_111_111_222_222_222))
    run(["cp", "-p", single, mnt / "single"])  # data written, then futimens on the open fd
    st = (mnt / "single").stat()
    assert st.st_mtime_ns == 1_111_111_111_222_222_222
    assert stat.S_IMODE(st.st_mode) == 0o604
    assert (mnt / "single").read_bytes() == single.read_bytes()


def test_utimens_on_a_file_with_staged_writes_wins_over_them(mnt: Path) -> None:
    path = mnt / "f"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"staged data")
        os.utime(fd, ns=(10**18, 1_000_000_000_000_000_000))
        assert os.fstat(fd).st_mtime_ns == 1_000_000_000_000_000_000
    finally:
        os.close(fd)
    assert path.stat().st_mtime_ns == 1_000_000_000_000_000_000
    assert path.read_bytes() == b"staged data"


def test_directory_mtime_follows_its_entries(mnt: Path) -> None:
    d = mnt / "d"
    d.mkdir()
    old = 1_000_000_000 * 10**9

    def changed(action: Callable[[], object]) -> bool:
        os.utime(d, ns=(old, old))
        action()
        return d.stat().st_mtime_ns > old

    assert changed(lambda: (d / "f").write_text("x"))
    assert changed(lambda: os.mkdir(d / "sub"))
    assert changed(lambda: os.rename(d / "f", d / "g"))
    assert changed(lambda: os.unlink(d / "g"))
    assert changed(lambda: os.rmdir(d / "sub"))
    assert changed(lambda: os.symlink("x", d / "l"))
    assert not changed(lambda: (d / "l").lstat())


def test_rm_rf_find_and_du_on_a_wide_tree(mnt: Path) -> None:
    root = mnt / "wide"
    for i in range(20):
        sub = root / f"dir{i:02d}"
        sub.mkdir(parents=True)
        for j in range(50):
            (sub / f"file{j:02d}").write_bytes(b"x" * (j * 10))
    found = run(["find", root, "-type", "f"]).stdout.split()
    assert len(found) == 1000
    du = run(["du", "-s", "--apparent-size", "--block-size=1", root]).stdout.split()[0]
    assert int(du) >= 20 * sum(j * 10 for j in range(50))
    run(["rm", "-rf", root])
    assert not root.exists()
    assert os.listdir(mnt) == []


def test_posix_fallocate_gives_zeros_and_o_tmpfile_is_refused(mnt: Path) -> None:
    path = mnt / "prealloc"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"head")
        try:
            os.posix_fallocate(fd, 0, 3 * MiB)  # glibc falls back to writing when unsupported
        except OSError as exc:
            assert exc.errno == errno.EOPNOTSUPP, exc
        else:
            assert os.fstat(fd).st_size == 3 * MiB
            assert os.pread(fd, 3 * MiB, 0) == b"head" + bytes(3 * MiB - 4)
    finally:
        os.close(fd)
    tmpfile = getattr(os, "O_TMPFILE", None)
    if tmpfile is not None:
        code = errno_of(lambda: os.close(os.open(mnt, tmpfile | os.O_RDWR, 0o600)))
        assert code in (errno.EOPNOTSUPP, errno.EISDIR), code
    assert os.listdir(mnt) == ["prealloc"]


def test_mount_and_umount_with_spaces_and_commas_in_paths(tmp_path: Path) -> None:
    """Regression: the data dir went unescaped into the fsname option, so a comma in its
    path split the option and the mount failed."""
    if fuse_unavailable():
        pytest.skip(f"FUSE unavailable: {fuse_unavailable()}")
    node = SwarmMount(tmp_path / "odd dir", "name with space, comma")
    try:
        node.mount()
        (node.mountpoint / "f").write_text("works")
        node.umount()
        assert not node.is_mounted()
        node.mount()
        assert (node.mountpoint / "f").read_text() == "works"
        node.umount()
        assert node.log_problems() == []
    finally:
        node.cleanup()
