"""The filesystem as seen by one node: every operation, by inode and name, errno on failure.

``Filesystem`` is what ``fuse/operations.py`` calls, and what tests call
directly without a mount (as S3QL's ``t3_fs_api``). It keeps the per-inode
state the kernel protocol needs: lookup counts (an inode lives until
``forget`` brings it to 0; after an unlink, a regular file's only while it is
open, see ``_kept_inode``), open handles, and staged writes, committed on
``flush``/``fsync`` (DESIGN.md §3, §8).

Runs on the trio event loop. Database reads are short queries on the loop
thread; writes, hashing, encryption and file I/O go to worker threads.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import trio

from swarmfs import CHUNK_SIZE
from swarmfs.crypto.staging import StagingCipher
from swarmfs.fs.content import ChunkIO
from swarmfs.fs.staging import Staging
from swarmfs.meta.db import ROOT_INO, Database, Row, Txn, now_ns
from swarmfs.meta.records import Block, Kind, join

log = logging.getLogger(__name__)

NAME_MAX = 255
READ_AHEAD = 8  # chunks prefetched ahead of a sequential reader
SEAL_AHEAD = 4  # full chunks being hashed and encrypted behind the writers, node-wide
MAX_FILE_SIZE = 1 << 43  # 8 TiB: larger offsets get EFBIG
READDIR_BATCH = 256
INLINE_FREE_MAX = 64 * CHUNK_SIZE  # detached files up to this size are freed on the loop
SWEEP_BATCH = 256  # detached inodes freed per transaction by the sweep

_KIND_BITS = {
    Kind.FILE: stat.S_IFREG,
    Kind.DIR: stat.S_IFDIR,
    Kind.SYMLINK: stat.S_IFLNK,
    Kind.FIFO: stat.S_IFIFO,
    Kind.SOCKET: stat.S_IFSOCK,
}


class KernelCache(Protocol):
    """Invalidates the kernel's caches after a remote change (``fuse.invalidator``)."""

    def entry(self, parent_ino: int, name: bytes, deleted_ino: int | None) -> None: ...

    def inode(self, ino: int, attr_only: bool) -> None: ...


class FsError(Exception):
    """An operation failed with ``errno``; the FUSE layer passes it to the caller."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or os.strerror(code))
        self.errno = code


@dataclass(frozen=True)
class Attr:
    ino: int
    mode: int  # file type bits | permission bits
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@dataclass(frozen=True)
class Caller:
    uid: int = 0
    gid: int = 0
    umask: int = 0o022


@dataclass
class Handle:
    ino: int
    writable: bool
    append: bool
    next_offset: int = 0  # where a sequential reader will read next (read-ahead)


def chunk_count(size: int) -> int:
    return (size + CHUNK_SIZE - 1) // CHUNK_SIZE


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL)
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        raise FsError(errno.EILSEQ) from None


class Filesystem:
    def __init__(self, db: Database, chunks: ChunkIO, staging_dir: Path) -> None:
        self.db = db
        self.chunks = chunks
        self.staging_dir = staging_dir
        self._cipher = StagingCipher()
        self._lookups: dict[int, int] = {}
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._staging: dict[int, Staging] = {}
        self._locks: dict[int, trio.Lock] = {}
        self._unsynced: dict[int, set[bytes]] = {}  # chunks written but not fsynced, per inode
        self.read_only = False
        self.kernel: KernelCache | None = None
        self.nursery: trio.Nursery | None = None  # background sealing; set by the node
        # replication starts pushing a full chunk while the file is still being written
        self.on_chunk_stored: Callable[[bytes, int], Awaitable[object]] | None = None
        self._seal_slots = trio.Semaphore(SEAL_AHEAD)
        # inodes a remote change moved off their path: a later commit on them is a
        # concurrent edit of that path and goes through the merge rules
        self._displaced: dict[int, bytes] = {}
        # inodes whose removal is being committed; an open of one waits (``_removing``)
        self._removals: dict[int, trio.Event] = {}

    # -- helpers ----------------------------------------------------------------
    def _row(self, ino: int) -> Row:
        row = self.db.reader.by_ino(ino)
        if row is None:
            # Known to the kernel but gone: a file removed while nobody had it open
            # (``_kept_inode``). ESTALE makes the kernel look the path up again and
            # retry the open or stat, which then finds what is there now.
            raise FsError(errno.ESTALE if self._lookups.get(ino) else errno.ENOENT)
        return row

    def _dir_row(self, ino: int) -> Row:
        row = self._row(ino)
        if row.kind != Kind.DIR:
            raise FsError(errno.ENOTDIR)
        if row.deleted or row.hidden:
            raise FsError(errno.ENOENT)
        return row

    def _child(self, parent: Row, name: bytes) -> Row | None:
        row = self.db.reader.by_path(join(parent.path, name))
        return None if row is None or row.deleted else row

    def _lock(self, ino: int) -> trio.Lock:
        lock = self._locks.get(ino)
        if lock is None:
            lock = self._locks[ino] = trio.Lock()
        return lock

    def _writable(self) -> None:
        if self.read_only:
            raise FsError(errno.EROFS)

    def attr_of(self, row: Row, ino: int) -> Attr:
        size, mtime = row.size, row.mtime_ns
        staging = self._staging.get(ino)
        if staging is not None and staging.modified:
            size, mtime = staging.size, staging.mtime_ns or mtime
        nlink = 1
        if row.kind == Kind.DIR:
            nlink = 0 if row.deleted or row.hidden else 2 + self.db.reader.count_subdirs(row.path)
        elif row.hidden:
            nlink = 0
        return Attr(
            ino=ino,
            mode=_KIND_BITS[row.kind] | row.mode,
            nlink=nlink,
            uid=row.uid,
            gid=row.gid,
            size=size,
            atime_ns=row.atime_ns,
            mtime_ns=mtime,
            ctime_ns=row.ctime_ns,
        )

    def _entry(self, row: Row, ino: int) -> Attr:
        """An entry handed to the kernel: counts one lookup."""
        self._lookups[ino] = self._lookups.get(ino, 0) + 1
        return self.attr_of(row, ino)

    def _ino_for(self, row: Row) -> int:
        ino = self.db.reader.ino_of(row.rid)
        if ino is None:
            raise FsError(errno.ENOENT)
        return ino

    # -- lookups ------------------------------------------------------------------
    async def lookup(self, parent_ino: int, name: bytes) -> Attr:
        parent = self._dir_row(parent_ino)
        if name == b".":
            return self._entry(parent, parent_ino)
        if name == b"..":
            up = self.db.reader.by_path(
                parent.path.rsplit(b"/", 1)[0] if b"/" in parent.path else b""
            )
            assert up is not None
            return self._entry(up, self._ino_for(up))
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        found = self.db.reader.entry(join(parent.path, name))
        if found is None:
            raise FsError(errno.ENOENT)
        return self._entry(*found)

    async def getattr(self, ino: int) -> Attr:
        return self.attr_of(self._row(ino), ino)

    def add_lookup(self, ino: int) -> None:
        self._lookups[ino] = self._lookups.get(ino, 0) + 1

    async def forget(self, items: list[tuple[int, int]]) -> None:
        """Drop kernel references; detached (unlinked) inodes at 0 are freed, a batch of
        them in one transaction (``rm -rf`` makes one per file). Never raises."""
        released = []
        for ino, n in items:
            left = self._lookups.get(ino, 0) - n
            if left > 0:
                self._lookups[ino] = left
                continue
            self._lookups.pop(ino, None)
            if ino != ROOT_INO and not self._held(ino):
                released.append(ino)
        if released:
            await self._free_if_detached(released)

    def _held(self, ino: int) -> bool:
        """Whether the kernel holds ``ino`` (a lookup or an open handle)."""
        return self._lookups.get(ino, 0) > 0 or self._is_open(ino)

    def _is_open(self, ino: int) -> bool:
        return any(h.ino == ino for h in self._handles.values())

    async def _free_if_detached(self, inos: list[int]) -> None:
        try:
            # (a lookup racing a remote change may have handed one out again since)
            rows = [(ino, self.db.reader.by_ino(ino)) for ino in inos if not self._held(ino)]
            detached = [(ino, row) for ino, row in rows if row is not None and row.hidden]
            if not detached:
                return
            for ino, _ in detached:
                self._forget_state(ino)
            # blocks are dropped in the transaction: on the loop only for small files
            small = sum(row.size for _, row in detached) <= INLINE_FREE_MAX

            def txn(t: Txn) -> list[bytes]:
                return [c for ino, _ in detached for c in t.forget_hidden(ino)]

            await self._delete_chunks(await self.db.write(txn, small=small))
        except Exception:
            log.exception("freeing detached inodes %s failed", inos[:8])

    def _forget_state(self, ino: int) -> None:
        """Drop what this process keeps for an inode that is gone for good."""
        self._drop_staging(ino)
        self._displaced.pop(ino, None)

    def _drop_staging(self, ino: int) -> None:
        staging = self._staging.pop(ino, None)
        if staging is not None:
            staging.close()
        self._locks.pop(ino, None)
        self._unsynced.pop(ino, None)

    # -- directories ----------------------------------------------------------------
    async def opendir(self, ino: int) -> int:
        self._dir_row(ino)
        return ino

    async def readdir(self, ino: int, start: int) -> Iterator[tuple[bytes, Attr, int]]:
        """Entries after offset ``start``: (name, attr, next offset). Offsets are record ids,
        stable across concurrent changes. The caller counts a lookup per accepted entry."""
        row = self._row(ino)
        if row.kind != Kind.DIR:
            raise FsError(errno.ENOTDIR)
        if row.deleted or row.hidden:
            return iter(())
        entries = self.db.reader.entries(row.path, start, READDIR_BATCH)
        return iter([(child.name, self.attr_of(child, ino), child.rid) for child, ino in entries])

    async def mkdir(self, parent_ino: int, name: bytes, mode: int, caller: Caller) -> Attr:
        return await self._create_node(parent_ino, name, Kind.DIR, mode, caller)

    async def mknod(self, parent_ino: int, name: bytes, mode: int, caller: Caller) -> Attr:
        fmt = stat.S_IFMT(mode)
        kinds = {stat.S_IFREG: Kind.FILE, stat.S_IFIFO: Kind.FIFO, stat.S_IFSOCK: Kind.SOCKET}
        if fmt not in kinds:
            raise FsError(errno.EPERM)  # device nodes are not replicated (documented)
        return await self._create_node(parent_ino, name, kinds[fmt], mode, caller)

    async def symlink(self, parent_ino: int, name: bytes, target: bytes, caller: Caller) -> Attr:
        if len(target) > 4095:
            raise FsError(errno.ENAMETOOLONG)
        return await self._create_node(
            parent_ino, name, Kind.SYMLINK, 0o777, Caller(caller.uid, caller.gid, 0), target
        )

    async def create(
        self, parent_ino: int, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[int, Attr]:
        attr = await self._create_node(parent_ino, name, Kind.FILE, mode, caller)
        return self._open_handle(attr.ino, flags), attr

    async def _create_node(
        self,
        parent_ino: int,
        name: bytes,
        kind: Kind,
        mode: int,
        caller: Caller,
        target: bytes = b"",
    ) -> Attr:
        self._writable()
        check_name(name)
        parent = self._dir_row(parent_ino)
        if self._child(parent, name) is not None:
            raise FsError(errno.EEXIST)
        perm = stat.S_IMODE(mode) & ~caller.umask
        gid = caller.gid
        if parent.mode & stat.S_ISGID:  # BSD group semantics of setgid directories
            gid = parent.gid
            if kind == Kind.DIR:
                perm |= stat.S_ISGID
        path = join(parent.path, name)
        now = now_ns()

        def txn(t: Txn) -> tuple[Row | None, int]:
            existing = t.by_path(path)
            if existing is not None and not existing.deleted:
                raise FsError(errno.EEXIST)
            rid, ino = t.create(path, kind, perm, caller.uid, gid, now, target)
            return t.by_rid(rid), ino  # the writer's cache is warm; the reader's is not

        row, ino = await self.db.write(txn, small=True)
        assert row is not None
        return self._entry(row, ino)

    async def unlink(self, parent_ino: int, name: bytes) -> None:
        await self._remove(parent_ino, name, want_dir=False)

    async def rmdir(self, parent_ino: int, name: bytes) -> None:
        await self._remove(parent_ino, name, want_dir=True)

    async def _remove(self, parent_ino: int, name: bytes, want_dir: bool) -> None:
        self._writable()
        parent = self._dir_row(parent_ino)
        row = self._child(parent, name)
        if row is None:
            raise FsError(errno.ENOENT)
        if want_dir and row.kind != Kind.DIR:
            raise FsError(errno.ENOTDIR)
        if not want_dir and row.kind == Kind.DIR:
            raise FsError(errno.EISDIR)
        if want_dir and self.db.reader.has_children(row.path):
            raise FsError(errno.ENOTEMPTY)
        ino = self.db.reader.ino_of(row.rid)
        if ino is not None and self._has_staged(ino):
            await self._commit(ino)  # the trash keeps what was last written
            row = self.db.reader.by_rid(row.rid) or row
        keep = self._kept_inode(ino, row.kind)
        now = now_ns()
        async with self._removing(ino if keep is None else None):
            await self.db.write(lambda t: t.delete(row, now, keep), small=True)

    def _kept_inode(self, ino: int | None, kind: Kind) -> int | None:
        """The inode a removed record leaves to a hidden copy, or None (it goes with the
        record). After its unlink, a regular file is used through open handles; a path
        the kernel still resolves to it (a lookup racing the removal) gets ESTALE and is
        looked up again (``_row``), and an open arriving meanwhile waits for the removal
        (``_removing``). Directories (a working directory), FIFOs and sockets (opened
        without a FUSE open) keep theirs while the kernel knows them."""
        if ino is None:
            return None
        if kind != Kind.FILE:
            return ino if self._held(ino) else None
        return ino if self._is_open(ino) else None

    @asynccontextmanager
    async def _removing(self, ino: int | None) -> AsyncIterator[None]:
        """Around the transaction that takes ``ino`` away with its record: an ``open``
        of it meanwhile waits, then finds it gone (it would have held a handle to an
        inode about to vanish)."""
        if ino is None:
            yield
            return
        done = self._removals[ino] = trio.Event()
        try:
            yield
            self._forget_state(ino)
        finally:
            self._removals.pop(ino, None)
            done.set()

    async def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        self._writable()
        RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
        if flags & RENAME_EXCHANGE:
            raise FsError(errno.EINVAL)
        check_name(new_name)
        src_dir = self._dir_row(old_parent)
        dst_dir = self._dir_row(new_parent)
        src = self._child(src_dir, old_name)
        if src is None:
            raise FsError(errno.ENOENT)
        new_path = join(dst_dir.path, new_name)
        if new_path == src.path:
            return
        if src.kind == Kind.DIR and new_path.startswith(src.path + b"/"):
            raise FsError(errno.EINVAL)
        dst = self._child(dst_dir, new_name)
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if src.kind == Kind.DIR and dst.kind != Kind.DIR:
                raise FsError(errno.ENOTDIR)
            if src.kind != Kind.DIR and dst.kind == Kind.DIR:
                raise FsError(errno.EISDIR)
            if dst.kind == Kind.DIR and self.db.reader.has_children(dst.path):
                raise FsError(errno.ENOTEMPTY)
        src_ino = self.db.reader.ino_of(src.rid)
        if src_ino is not None and self._has_staged(src_ino):
            await self._commit(src_ino)
            src = self.db.reader.by_rid(src.rid) or src
        dst_ino = self.db.reader.ino_of(dst.rid) if dst is not None else None
        if dst_ino is not None and dst is not None and self._has_staged(dst_ino):
            await self._commit(dst_ino)
            dst = self.db.reader.by_rid(dst.rid) or dst
        keep = self._kept_inode(dst_ino, dst.kind) if dst is not None else None
        now = now_ns()

        def txn(t: Txn) -> None:
            if dst is not None:
                t.delete(dst, now, keep)
            t.move(src, new_path, now)

        async with self._removing(dst_ino if keep is None else None):
            await self.db.write(txn)

    # -- attributes ------------------------------------------------------------------
    async def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        fh: int | None = None,
    ) -> Attr:
        row = self._row(ino)
        if any(v is not None for v in (mode, uid, gid, size, atime_ns, mtime_ns)):
            self._writable()
        if size is not None:
            if row.kind == Kind.DIR:
                raise FsError(errno.EISDIR)
            if row.kind != Kind.FILE:
                raise FsError(errno.EINVAL)
            if size > MAX_FILE_SIZE:
                raise FsError(errno.EFBIG)
            async with self._lock(ino):
                await self._truncate(ino, row, size)
                if not self._writes_through(fh, ino):
                    await self._commit_locked(ino)
            row = self._row(ino)
        attrs: dict[str, object] = {}
        if mode is not None:
            attrs["mode"] = stat.S_IMODE(mode)
        if uid is not None:
            attrs["uid"] = uid
        if gid is not None:
            attrs["gid"] = gid
        if atime_ns is not None:
            attrs["atime_ns"] = atime_ns
        if mtime_ns is not None:
            if self._has_staged(ino):
                async with self._lock(ino):
                    await self._commit_locked(ino)
            attrs["mtime_ns"] = mtime_ns
        if attrs:
            if "uid" in attrs or "gid" in attrs:  # chown clears setuid/setgid on files
                current = attrs.get("mode", row.mode)
                if row.kind == Kind.FILE:
                    attrs["mode"] = current & ~(stat.S_ISUID | stat.S_ISGID)  # type: ignore[operator]
            now = now_ns()
            await self.db.write(lambda t: t.update_attrs(row.rid, now, **attrs), small=True)
        return self.attr_of(self._row(ino), ino)

    async def readlink(self, ino: int) -> bytes:
        row = self._row(ino)
        if row.kind != Kind.SYMLINK:
            raise FsError(errno.EINVAL)
        return row.target

    # -- files -------------------------------------------------------------------------
    def _open_handle(self, ino: int, flags: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        acc = flags & os.O_ACCMODE
        self._handles[fh] = Handle(ino, acc != os.O_RDONLY, bool(flags & os.O_APPEND))
        return fh

    def _writes_through(self, fh: int | None, ino: int) -> bool:
        """Whether ``fh`` is a writable handle of ``ino``: then a change through it (an
        ``ftruncate``) is staged like a write and committed when that handle is flushed
        (``split`` and ``cp`` truncate each new file: one commit per file, not two)."""
        handle = self._handles.get(fh) if fh is not None else None
        return handle is not None and handle.ino == ino and handle.writable

    def _handle(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        return handle

    async def open(self, ino: int, flags: int) -> int:
        removal = self._removals.get(ino)
        if removal is not None:
            await removal.wait()
        row = self._row(ino)
        if row.kind == Kind.DIR:
            raise FsError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            self._writable()
        fh = self._open_handle(ino, flags)
        if flags & os.O_TRUNC and row.kind == Kind.FILE:
            async with self._lock(ino):
                await self._truncate(ino, row, 0)
        return fh

    def _staging_for(self, ino: int, row: Row) -> Staging:
        staging = self._staging.get(ino)
        if staging is None:
            staging = self._staging[ino] = Staging(
                self.staging_dir / f"{os.getpid()}-{ino}", self._cipher, row.size
            )
        return staging

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._handle(fh)
        ino = handle.ino
        if self._has_staged(ino):
            async with self._lock(ino):
                return await self._read_range(ino, offset, size, ahead=0)
        sequential = offset in (handle.next_offset, 0)
        handle.next_offset = offset + size
        return await self._read_range(ino, offset, size, ahead=READ_AHEAD if sequential else 0)

    async def _read_range(self, ino: int, offset: int, size: int, ahead: int) -> bytes:
        """Bytes of the file as this node sees it; ``ahead`` chunks past the range are
        prefetched (loaded, decrypted, fetched from peers if missing) meanwhile."""
        row = self._row(ino)
        staging = self._staging.get(ino)
        live = staging is not None and staging.modified
        file_size = staging.size if live else row.size  # type: ignore[union-attr]
        end = min(offset + size, file_size)
        if offset >= end:
            return b""
        first, last = offset // CHUNK_SIZE, (end - 1) // CHUNK_SIZE
        blocks = self.db.reader.blocks(row.bl, first, last + ahead)
        if ahead:
            self.chunks.prefetch([blocks[i] for i in sorted(blocks) if i > last])
        parts = []
        for i in range(first, last + 1):
            length = min(CHUNK_SIZE, file_size - i * CHUNK_SIZE)
            data = await self._chunk_content(
                ino, i, blocks.get(i), length, staging if live else None
            )
            lo = offset - i * CHUNK_SIZE if i == first else 0
            hi = end - i * CHUNK_SIZE if i == last else length
            parts.append(data[lo:hi])
        return b"".join(parts)

    async def _chunk_content(
        self, ino: int, index: int, block: Block | None, length: int, staging: Staging | None
    ) -> bytes:
        """Logical content of chunk ``index``, ``length`` bytes, staged writes included."""
        if staging is not None and index in staging.sealing:
            base = staging.sealing[index]
        elif staging is not None and index in staging.pending:
            base = await self.chunks.read(staging.pending[index])
        elif block is not None:
            base = await self.chunks.read(block)
            if staging is not None:
                base = base[: max(0, staging.trunc_floor - index * CHUNK_SIZE)]
        else:
            base = b""
        if staging is not None:
            return await staging.overlay(index, base, length)
        if len(base) >= length:
            return base[:length]
        return base + bytes(length - len(base))

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        self._writable()
        handle = self._handle(fh)
        if not handle.writable:
            raise FsError(errno.EBADF)
        ino = handle.ino
        if offset + len(data) > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG)
        async with self._lock(ino):
            # an open handle keeps its inode: the query is needed only to start staging
            staging = self._staging.get(ino) or self._staging_for(ino, self._row(ino))
            if staging.seal_error is not None:  # e.g. ENOSPC: the writer learns at once
                error, staging.seal_error = staging.seal_error, None
                raise error
            if handle.append:
                offset = staging.size
            pos = 0
            while pos < len(data):
                index, within = divmod(offset + pos, CHUNK_SIZE)
                n = min(CHUNK_SIZE - within, len(data) - pos)
                piece = data[pos : pos + n]
                if n == CHUNK_SIZE and index not in staging.dirty:
                    await self._seal_in_background(staging, index, piece)
                elif await staging.write(index, within, piece):
                    full = await staging.complete_data(index)
                    del staging.dirty[index]
                    await self._seal_in_background(staging, index, full)
                pos += n
            staging.size = max(staging.size, offset + len(data))
            staging.mtime_ns = now_ns()
        return len(data)

    async def _seal_in_background(self, staging: Staging, index: int, data: bytes) -> None:
        """Hand a full chunk to a worker and return, so the writer's next chunk arrives
        while this one is hashed and encrypted; at most SEAL_AHEAD chunks node-wide."""
        staging.sealing[index] = data
        staging.modified = True
        if self.nursery is None:
            staging.inflight.add(index)
            staging.seal_finished(index, data, await self.chunks.seal_and_store(data))
            return
        await self._seal_slots.acquire()
        staging.inflight.add(index)
        self.nursery.start_soon(self._seal_task, staging, index, data)

    async def _seal_task(self, staging: Staging, index: int, data: bytes) -> None:
        result, error = None, None
        try:
            result = await self.chunks.seal_and_store(data)
        except OSError as exc:
            log.warning("storing a written chunk of %s failed: %s", staging.path.name, exc)
            error = exc
        except Exception:
            log.exception("storing a written chunk failed; retried at commit")
        finally:
            self._seal_slots.release()
            staging.seal_finished(index, data, result, error)
            del data  # stored: not held while the push waits for the metadata writer
        if result is not None and self.on_chunk_stored is not None:
            try:
                await self.on_chunk_stored(result[0].chunk_id, result[1])  # type: ignore[arg-type]
            except Exception as exc:  # e.g. the database's disk is full: the commit queues it
                log.warning("queueing a written chunk for peers failed: %s", exc)

    async def _truncate(self, ino: int, row: Row, size: int) -> None:
        """Stage a truncate (lock held); a stored chunk cut in the middle becomes staged data."""
        staging = self._staging_for(ino, row)
        index, within = divmod(size, CHUNK_SIZE)
        await staging.wait_inflight()
        base = None
        if within and index in staging.sealing:
            base = staging.sealing.pop(index)
        elif within and index in staging.pending:
            base = await self.chunks.read(staging.pending.pop(index))
        if base is not None:  # the kept part, with what was written over it, becomes staged
            await staging.write(index, 0, await staging.overlay(index, base, within))
        staging.truncate(size)
        staging.mtime_ns = now_ns()

    async def flush(self, fh: int) -> None:
        handle = self._handle(fh)
        await self._commit(handle.ino)

    async def fsync(self, fh: int) -> None:
        handle = self._handle(fh)
        await self._commit(handle.ino)
        unsynced = self._unsynced.pop(handle.ino, set())
        if unsynced:
            await self.chunks.sync(sorted(unsynced))
        await trio.to_thread.run_sync(self.db.fsync_sync)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        ino = handle.ino
        await self._commit(ino)  # writes after the last flush (mmap), if any
        if not self._is_open(ino):
            staging = self._staging.pop(ino, None)
            if staging is not None and not staging.modified:
                staging.close()
            elif staging is not None:
                self._staging[ino] = staging
            if self._lookups.get(ino, 0) == 0:
                await self._free_if_detached([ino])

    def _has_staged(self, ino: int) -> bool:
        """Whether ``ino`` has writes not committed yet (only files ever do)."""
        staging = self._staging.get(ino)
        return staging is not None and staging.modified

    async def _commit(self, ino: int) -> None:
        if not self._has_staged(ino):
            return
        async with self._lock(ino):
            await self._commit_locked(ino)

    async def _commit_locked(self, ino: int) -> None:
        """Store the staged chunks, then one transaction for blocks and record."""
        staging = self._staging.get(ino)
        if staging is None or not staging.modified:
            return
        await staging.wait_inflight()
        for index, data in sorted(staging.sealing.items()):  # those whose background seal failed
            staging.inflight.add(index)
            try:
                result = await self.chunks.seal_and_store(data)
            except BaseException:
                staging.seal_finished(index, data, None)  # still staged, never "in flight"
                raise
            staging.seal_finished(index, data, result)
        row = self._row(ino)
        size = staging.size
        changed: dict[int, Block] = dict(staging.pending)
        new_chunks = list(staging.new_chunks)
        for index in sorted(staging.dirty):
            length = min(CHUNK_SIZE, size - index * CHUNK_SIZE)
            if length <= 0:
                continue
            block = self.db.reader.blocks(row.bl, index, index).get(index)
            data = await self._chunk_content(ino, index, block, length, staging)
            sealed, csize = await self.chunks.seal_and_store(data)
            changed[index] = sealed
            new_chunks.append((sealed.chunk_id, csize))  # type: ignore[arg-type]
        # committed content past the truncation floor is gone: cut the boundary chunk
        floor = staging.trunc_floor
        boundary, within = divmod(floor, CHUNK_SIZE)
        if within and boundary not in changed and floor < size:
            block = self.db.reader.blocks(row.bl, boundary, boundary).get(boundary)
            if block is not None and block.length > within:
                data = (await self.chunks.read(block))[:within]
                sealed, csize = await self.chunks.seal_and_store(data)
                changed[boundary] = sealed
                new_chunks.append((sealed.chunk_id, csize))  # type: ignore[arg-type]
        keep = min(chunk_count(size), -(-floor // CHUNK_SIZE))
        mtime = staging.mtime_ns or now_ns()
        now = now_ns()

        def txn(t: Txn) -> list[bytes]:
            return t.commit_content(
                row.rid, size, mtime, now, changed, keep, chunk_count(size), new_chunks
            )

        # a small file on the loop; dropping or copying a big block list in the writer
        small = len(changed) + chunk_count(row.size) <= 2
        gone = await self.db.write(txn, small=small)
        self._unsynced.setdefault(ino, set()).update(c for c, _ in new_chunks)
        staging.reset(size)
        try:  # committed: a failing clean-up must not make close() report an error
            await self._delete_chunks(gone)
        except OSError as exc:
            log.warning("removing superseded chunks failed (GC retries): %s", exc)
        if ino in self._displaced:
            await self._commit_displaced(ino, self._displaced[ino])

    async def _commit_displaced(self, ino: int, path: bytes) -> None:
        """A file changed remotely while open here was written here too: offer this
        version to its path as a concurrent edit (the later one wins, the other is
        kept as a conflict copy; an edit beats a concurrent delete)."""
        hidden = self._row(ino)
        node_id = self.db.node_id
        rec = replace(
            self.db.reader.record(hidden),
            path=path,
            deleted=False,
            version=hidden.version.bump(node_id),
            modified_by=node_id,
        )

        def txn(t: Txn) -> list[tuple[bytes, bytes, int | None, bool]]:
            t.offer_displaced(hidden.rid, rec)
            return t.invalidations

        await self.remote_applied(await self.db.write(txn))

    async def sweep_detached(self) -> None:
        """Free detached inodes the kernel holds no reference to (remote changes detach
        every replaced inode, since a lookup may be racing the change)."""
        known = self.known_inodes()
        unheld = [ino for ino in self.db.reader.hidden_inodes() if ino not in known]
        for start in range(0, len(unheld), SWEEP_BATCH):
            await self._free_if_detached(unheld[start : start + SWEEP_BATCH])

    def staged_chunk_ids(self) -> frozenset[bytes]:
        """Chunks stored for writes not committed yet: equal content gives equal ids, so
        one of these may look unreferenced to a commit or to GC, yet must stay."""
        ids: set[bytes] = set()
        for staging in self._staging.values():
            ids.update(b.chunk_id for b in staging.pending.values() if b.chunk_id)
            ids.update(c for c, _ in staging.new_chunks)
        return frozenset(ids)

    async def _delete_chunks(self, chunk_ids: list[bytes]) -> None:
        await self.chunks.delete([c for c in chunk_ids if c not in self.staged_chunk_ids()])

    def known_inodes(self) -> set[int]:
        """Inodes the kernel holds references to (lookups or open handles)."""
        return set(self._lookups) | {h.ino for h in self._handles.values()}

    async def remote_applied(self, changes: list[tuple[bytes, bytes, int | None, bool]]) -> None:
        """Records from peers were applied: note open inodes they displaced, and drop
        what the kernel cached about them."""
        known = self.known_inodes()
        for parent_path, name, old_ino, same_content in changes:
            if old_ino in known and not same_content:
                self._displaced[old_ino] = join(parent_path, name)
            if self.kernel is None:
                continue
            parent = self.db.reader.by_path(parent_path)
            parent_ino = self.db.reader.ino_of(parent.rid) if parent is not None else None
            if same_content and old_ino is not None:
                self.kernel.inode(old_ino, attr_only=True)
            elif parent_ino is not None:
                self.kernel.entry(parent_ino, name, old_ino)
            if old_ino is not None and not same_content:
                self.kernel.inode(old_ino, attr_only=False)
            if parent_ino is not None:
                self.kernel.inode(parent_ino, attr_only=True)

    async def statfs(self) -> os.statvfs_result:
        return await trio.to_thread.run_sync(os.statvfs, self.staging_dir)

    async def commit_all(self) -> list[str]:
        """Commit every inode with staged writes (shutdown); one failure stops no other.
        Returns what could not be committed."""
        failed = []
        for ino in list(self._staging):
            try:
                await self._commit(ino)
            except Exception as exc:
                log.error("committing inode %d at shutdown failed: %s", ino, exc)
                failed.append(f"inode {ino}: {exc}")
        return failed
