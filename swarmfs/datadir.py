"""The data dir: where one node keeps its keys, database, chunks, log and lock.

The layout is DESIGN.md §1. A running node holds ``flock(2)`` on ``DIR/lock``
for its whole life and writes its pid into that file, so a second node on the
same dir fails at once and can say who holds it; the kernel drops the lock when
the process dies, however it dies, so a crash never leaves the dir locked.
``swarmfs.pid`` is the same pid for tools; it may outlive a crash, which is
why ``read_pid`` trusts it only while the lock is held.

Synchronous and meant for the CLI and the node's start-up, before trio runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
from pathlib import Path

from swarmfs.crypto.keys import (
    NodeIdentity,
    encode_swarm_key,
    new_swarm_key,
    read_swarm_key,
    write_secret,
)
from swarmfs.errors import UserError


class DataDirLock:
    """The held ``flock`` on ``DIR/lock``; released by ``release()`` or process exit."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class DataDir:
    """Paths of one data dir, and the operations that keep it consistent."""

    def __init__(self, path: Path) -> None:
        # Resolved, because the FUSE fsname ``swarmfs:DIR`` must name it unambiguously.
        self.path = Path(path).expanduser().resolve()
        self.swarm_key_file = self.path / "swarm.key"
        self.node_key_file = self.path / "node.key"
        self.db_file = self.path / "swarmfs.db"
        self.chunks_dir = self.path / "chunks"
        self.staging_dir = self.path / "staging"
        self.log_file = self.path / "swarmfs.log"
        self.pid_file = self.path / "swarmfs.pid"
        self.lock_file = self.path / "lock"
        self.config_file = self.path / "config.toml"
        self.control_socket = self.path / "control.sock"

    def __repr__(self) -> str:
        return f"DataDir({str(self.path)!r})"

    def create(self) -> None:
        """Make the directory (mode 0700: it holds secrets) if it does not exist."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create data dir {self.path}: {exc.strerror}") from None
        if not self.path.is_dir():
            raise UserError(f"data dir {self.path} is not a directory")

    def is_initialised(self) -> bool:
        return self.node_key_file.exists() and self.swarm_key_file.exists()

    def init(self, swarm_key_file: Path | None = None) -> None:
        """Create what is missing: the dir, the node identity, the swarm key.

        With ``swarm_key_file`` the swarm key is taken from it; a dir that already
        has a different key refuses it, since switching swarms would orphan
        everything stored under the old key.
        """
        self.create()
        if not self.node_key_file.exists():
            NodeIdentity.generate().save(self.node_key_file)
        if swarm_key_file is None:
            if not self.swarm_key_file.exists():
                write_secret(self.swarm_key_file, encode_swarm_key(new_swarm_key()))
            return
        given = read_swarm_key(swarm_key_file)
        if not self.swarm_key_file.exists():
            write_secret(self.swarm_key_file, encode_swarm_key(given))
        elif self.swarm_key() != given:
            raise UserError(
                f"{swarm_key_file} holds a different swarm key than {self.swarm_key_file};"
                " a data dir belongs to one swarm"
            )

    def identity(self) -> NodeIdentity:
        if not self.node_key_file.exists():
            raise UserError(f"data dir {self.path} is not initialised (run: swarmfs init)")
        return NodeIdentity.load(self.node_key_file)

    def swarm_key(self) -> bytes:
        if not self.swarm_key_file.exists():
            raise UserError(f"data dir {self.path} has no swarm key (run: swarmfs init)")
        return read_swarm_key(self.swarm_key_file)

    # --- lock and pid ---

    def acquire_lock(self) -> DataDirLock:
        """Lock the dir for this process's lifetime, or fail at once naming the holder."""
        self.create()
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.lock_holder()
            who = f"pid {holder}" if holder is not None else "another process"
            raise UserError(f"data dir {self.path} is in use by {who}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return DataDirLock(fd)

    def is_locked(self) -> bool:
        """Whether a live process (this one included) holds the lock."""
        try:
            fd = os.open(self.lock_file, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def lock_holder(self) -> int | None:
        """The pid that holds the lock, or None if nobody does (or it is not known yet)."""
        pid = _read_int(self.lock_file)
        return pid if pid is not None and self.is_locked() else None

    def write_pid(self) -> None:
        tmp = self.pid_file.with_name(self.pid_file.name + ".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(self.pid_file)

    def remove_pid(self) -> None:
        """Remove the pid file if it is this process's (never another node's)."""
        if _read_int(self.pid_file) == os.getpid():
            self.pid_file.unlink(missing_ok=True)

    def read_pid(self) -> int | None:
        """The running node's pid; None if the file is missing or left by a dead node."""
        pid = _read_int(self.pid_file)
        if pid is None or not _alive(pid) or not self.is_locked():
            return None
        return pid

    def wait_released(self, timeout: float) -> bool:
        """Wait until the lock holder has exited; False if it still runs after ``timeout``.

        Waits on a pidfd (no polling): the kernel closes a process's files, and
        so drops its flock, before the pidfd becomes readable.
        """
        pid = self.lock_holder()
        if pid is None:
            return True
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return not self.is_locked()
        try:
            exited = bool(select.select([pidfd], [], [], timeout)[0])
        finally:
            os.close(pidfd)
        return exited and not self.is_locked()


def _read_int(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().strip())
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True
