"""pyfuse3 ``Operations``: a thin translation onto ``fs.namespace.Filesystem``.

Every handler goes through ``_guard``: ``FsError`` and ``OSError`` become their
errno, anything unexpected is logged once with its traceback and becomes EIO,
so one bad request never takes the mount down. ``forget`` never raises.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from swarmfs import CHUNK_SIZE
from swarmfs.errors import ChunkMissing, CorruptChunk
from swarmfs.fs.namespace import Attr, Caller, Filesystem, FsError

log = logging.getLogger(__name__)

ENTRY_TIMEOUT = 5.0  # seconds; remote changes invalidate explicitly, this is a backstop
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _guard(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except (ChunkMissing, CorruptChunk) as exc:
            log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.warning("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _entry(attr: Attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = attr.ino
    e.generation = 0
    e.entry_timeout = ENTRY_TIMEOUT
    e.attr_timeout = ENTRY_TIMEOUT
    e.st_mode = attr.mode
    e.st_nlink = attr.nlink
    e.st_uid = attr.uid
    e.st_gid = attr.gid
    e.st_rdev = 0
    e.st_size = attr.size
    e.st_blksize = CHUNK_SIZE
    e.st_blocks = (attr.size + 511) // 512
    e.st_atime_ns = attr.atime_ns
    e.st_mtime_ns = attr.mtime_ns
    e.st_ctime_ns = attr.ctime_ns
    return e


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(ctx.uid, ctx.gid, ctx.umask)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False  # the kernel must not own size and mtime (DESIGN.md §8)
    enable_acl = False

    def __init__(self, fs: Filesystem) -> None:
        super().__init__()
        self.fs = fs

    def init(self) -> None:
        log.info("filesystem initialised")

    @_guard
    async def lookup(self, parent_inode, name, ctx=None):
        return _entry(await self.fs.lookup(parent_inode, name))

    async def forget(self, inode_list):
        try:
            await self.fs.forget(list(inode_list))
        except Exception:
            log.exception("forget failed")

    @_guard
    async def getattr(self, inode, ctx=None):
        return _entry(await self.fs.getattr(inode))

    @_guard
    async def setattr(self, inode, attr, fields, fh, ctx):
        return _entry(
            await self.fs.setattr(
                inode,
                mode=attr.st_mode if fields.update_mode else None,
                uid=attr.st_uid if fields.update_uid else None,
                gid=attr.st_gid if fields.update_gid else None,
                size=attr.st_size if fields.update_size else None,
                atime_ns=attr.st_atime_ns if fields.update_atime else None,
                mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
                fh=fh,
            )
        )

    @_guard
    async def readlink(self, inode, ctx):
        return await self.fs.readlink(inode)

    @_guard
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return _entry(await self.fs.mknod(parent_inode, name, mode, _caller(ctx)))

    @_guard
    async def mkdir(self, parent_inode, name, mode, ctx):
        return _entry(await self.fs.mkdir(parent_inode, name, mode, _caller(ctx)))

    @_guard
    async def unlink(self, parent_inode, name, ctx):
        await self.fs.unlink(parent_inode, name)

    @_guard
    async def rmdir(self, parent_inode, name, ctx):
        await self.fs.rmdir(parent_inode, name)

    @_guard
    async def symlink(self, parent_inode, name, target, ctx):
        return _entry(await self.fs.symlink(parent_inode, name, target, _caller(ctx)))

    @_guard
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_guard
    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise FsError(errno.EPERM)  # hard links are not supported (documented)

    @_guard
    async def open(self, inode, flags, ctx):
        if flags & getattr(os, "O_TMPFILE", 0) == getattr(os, "O_TMPFILE", -1):
            raise FsError(errno.EOPNOTSUPP)
        fh = await self.fs.open(inode, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    @_guard
    async def create(self, parent_inode, name, mode, flags, ctx):
        fh, attr = await self.fs.create(parent_inode, name, mode, flags, _caller(ctx))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False), _entry(attr)

    @_guard
    async def read(self, fh, off, size):
        return await self.fs.read(fh, off, size)

    @_guard
    async def write(self, fh, off, buf):
        return await self.fs.write(fh, off, buf)

    @_guard
    async def flush(self, fh):
        await self.fs.flush(fh)

    @_guard
    async def release(self, fh):
        await self.fs.release(fh)

    @_guard
    async def fsync(self, fh, datasync):
        await self.fs.fsync(fh)

    @_guard
    async def opendir(self, inode, ctx):
        return await self.fs.opendir(inode)

    @_guard
    async def readdir(self, fh, start_id, token):
        for name, attr, next_id in await self.fs.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, _entry(attr), next_id):
                break
            self.fs.add_lookup(attr.ino)

    @_guard
    async def releasedir(self, fh):
        return None

    @_guard
    async def fsyncdir(self, fh, datasync):
        await trio.to_thread.run_sync(self.fs.db.fsync_sync)

    @_guard
    async def statfs(self, ctx):
        st = await self.fs.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = st.f_bsize
        s.f_frsize = st.f_frsize
        s.f_blocks = st.f_blocks
        s.f_bfree = st.f_bfree
        s.f_bavail = st.f_bavail
        s.f_files = st.f_files
        s.f_ffree = st.f_ffree
        s.f_favail = st.f_favail
        s.f_namemax = 255
        return s
