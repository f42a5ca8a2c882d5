"""Mounted-test discipline (STYLE.md habit 13): real node processes on real FUSE mounts.

``SwarmMount`` starts a node with the real ``swarmfs mount`` command, waits for
the mount with a deadline, and always takes it down again: ``swarmfs umount``
first, ``fusermount3 -uz`` as the last resort, and SIGKILL only for the node
pids this object itself saw start (read from ``DIR/swarmfs.pid``), never by
name. Every wait polls a condition against a deadline; nothing sleeps blindly.

The node's log is checked after each test (habit 11): a warning, error or
traceback fails the test unless the test declared it with ``expect_log``.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

MOUNT_TIMEOUT = 60.0
UMOUNT_TIMEOUT = 60.0
FSTYPE = "fuse.swarmfs"

_LOG_PROBLEM = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) |^Traceback ", re.MULTILINE)


def fuse_unavailable() -> str | None:
    """Why mounted tests cannot run here, or None when FUSE is usable."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (no FUSE in this kernel or container)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian package fuse3)"
    return None


def swarmfs_command() -> list[str]:
    script = Path(sys.executable).with_name("swarmfs")
    return [str(script)] if script.exists() else [sys.executable, "-m", "swarmfs"]


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.005) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
        interval = min(interval * 2, 0.1)


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as dead: it can no longer serve FUSE)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def mount_entry(mountpoint: Path) -> tuple[str, str] | None:
    """(fstype, source) of the topmost mount at ``mountpoint``, if any."""
    target = os.fsencode(os.path.realpath(mountpoint))
    found = None
    for line in Path("/proc/self/mountinfo").read_bytes().splitlines():
        fields = line.split(b" ")
        point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), fields[4])
        if point == target:
            sep = fields.index(b"-", 6)
            found = (fields[sep + 1].decode(), fields[sep + 2].decode())
    return found


def run(cmd: Iterable[str | os.PathLike[str]], timeout: float = 120, **kwargs: object):
    """Run a command, capture its output as text, fail the test on a non-zero exit."""
    cmd = [os.fspath(c) for c in cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(cmd)} exited {result.returncode}\nstdout: {result.stdout}\n"
        f"stderr: {result.stderr}"
    )
    return result


class SwarmMount:
    """One node's data dir and mountpoint under ``base``."""

    def __init__(self, base: Path, name: str = "node") -> None:
        self.data_dir = base / f"{name}-data"
        self.mountpoint = base / f"{name}-mnt"
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.pid: int | None = None
        self.listen = "127.0.0.1:0"
        self.mount_args: list[str] = []
        """More ``swarmfs mount`` options (--bootstrap, --swarm-key-file, --replicas ...)."""
        self._started: set[int] = set()
        self._expected: list[re.Pattern[str]] = []
        self._log_offset = 0

    @property
    def log_file(self) -> Path:
        return self.data_dir / "swarmfs.log"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "swarmfs.pid"

    def is_mounted(self) -> bool:
        entry = mount_entry(self.mountpoint)
        return entry is not None and entry[0] == FSTYPE

    def answers(self) -> bool:
        """The node serves the mount: ``statvfs`` always reaches it (``stat`` may be
        answered from the kernel's attribute cache for seconds after the node died)."""
        try:
            os.statvfs(self.mountpoint)
        except OSError:
            return False
        return self.is_mounted()

    def _read_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.pid_file.read_text().strip())
        return None

    # -- start and stop ---------------------------------------------------------------
    def mount(self) -> None:
        assert not self.answers(), f"{self.mountpoint} is already mounted"
        try:
            run(
                [
                    *swarmfs_command(),
                    "mount",
                    self.mountpoint,
                    "--data-dir",
                    self.data_dir,
                    "--listen",
                    self.listen,
                    *self.mount_args,
                ],
                timeout=MOUNT_TIMEOUT + 10,
            )
        finally:
            # even a failed start may have left a node running: cleanup() must know it
            started = self._read_pid()
            if started is not None and process_alive(started):
                self._started.add(started)
        # the launcher returns once the mount answers: the contract says so
        assert self.answers(), "swarmfs mount returned 0 but the mount does not answer"
        pid = wait_until(self._read_pid, 10, f"{self.pid_file}")
        assert process_alive(pid), f"pid {pid} from {self.pid_file} is not running"
        self.pid = pid
        self._started.add(pid)

    def umount(self) -> None:
        """Clean unmount through the real command; the node must exit."""
        pid = self.pid
        run(
            [*swarmfs_command(), "umount", self.mountpoint, "--data-dir", self.data_dir],
            timeout=UMOUNT_TIMEOUT,
        )
        if pid is not None:
            wait_until(lambda: not process_alive(pid), 30, f"node pid {pid} to exit")
        wait_until(lambda: not self.is_mounted(), 10, f"{self.mountpoint} to be unmounted")
        self.pid = None

    def kill9(self) -> None:
        """SIGKILL the node (the pid this mount started) and wait until it is gone."""
        pid = self.pid
        assert pid is not None and pid in self._started
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not process_alive(pid), 30, f"node pid {pid} to die")
        self.pid = None

    def cleanup(self) -> None:
        """Take everything down, whatever state a failed test left behind."""
        if self.is_mounted() and self.pid is not None and process_alive(self.pid):
            with contextlib.suppress(Exception):
                self.umount()
        if self.is_mounted():
            subprocess.run(
                ["fusermount3", "-uz", str(self.mountpoint)], capture_output=True, check=False
            )
        for pid in self._started:
            if process_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    # -- the node's log -----------------------------------------------------------------
    def expect_log(self, pattern: str) -> None:
        """Declare a warning or error the current test causes on purpose."""
        self._expected.append(re.compile(pattern))

    def log_problems(self) -> list[str]:
        """Unexpected warnings, errors and tracebacks logged since the last call."""
        try:
            with self.log_file.open("rb") as f:
                f.seek(self._log_offset)
                text = f.read().decode(errors="replace")
                self._log_offset = f.tell()
        except FileNotFoundError:
            return []
        problems = []
        for match in _LOG_PROBLEM.finditer(text):
            line_end = text.find("\n", match.start())
            line = text[match.start() : line_end if line_end >= 0 else None]
            if not any(p.search(line) for p in self._expected):
                problems.append(line)
        self._expected.clear()
        return problems


def errno_of(fn: Callable[[], object]) -> int:
    """The errno ``fn`` fails with (0 if it succeeds)."""
    try:
        fn()
    except OSError as exc:
        return exc.errno or -1
    return 0


def read_uncached(path: Path) -> bytes:
    """A file's content as the filesystem serves it, not as the page cache remembers it
    (POSIX_FADV_DONTNEED drops the file's clean cached pages first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def tree_snapshot(root: Path) -> dict[str, tuple]:
    """Everything a user sees of a tree: kind, mode, size, mtime, content or target."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            st = path.lstat()
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir", oct(st.st_mode), st.st_mtime_ns)
            elif not stat.S_ISREG(st.st_mode):  # fifo, socket: never open them
                out[rel] = ("special", oct(st.st_mode), st.st_mtime_ns)
            else:
                out[rel] = ("file", oct(st.st_mode), st.st_mtime_ns, read_uncached(path))
    return out


def make_tree(root: Path, seed: int = 0) -> None:
    """A small but varied tree: nested dirs, empty/small/chunk-sized/multi-chunk files,
    odd names, symlinks, modes and old mtimes (set last, leaves first)."""
    rng = random.Random(seed)
    mib = 1024 * 1024
    files = {
        "empty": b"",
        "small.txt": b"hello swarm\n",
        "one chunk.bin": rng.randbytes(mib),
        "multi.bin": rng.randbytes(2 * mib + 12345),
        "dir a/nested/deep/file.txt": b"deep\n" * 100,
        "dir a/ünïcödé ✓.txt": "ünïcödé\n".encode(),
        "dir a/nested/zeros": bytes(300_000),
        "b/script.sh": b"#!/bin/sh\necho hi\n",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "b" / "script.sh").chmod(0o755)
    (root / "small.txt").chmod(0o600)
    (root / "dir a" / "nested").chmod(0o750)
    (root / "empty dir").mkdir()
    os.symlink("../small.txt", root / "b" / "link to small")
    os.symlink("/nonexistent/dangling", root / "dangling")
    stamp = 1_000_000_000
    for dirpath, dirnames, filenames in sorted(os.walk(root), key=lambda t: -len(t[0])):
        for name in filenames + dirnames:
            stamp += 1111
            os.utime(
                Path(dirpath, name), ns=(stamp * 10**9, stamp * 10**9 + 123), follow_symlinks=False
            )
