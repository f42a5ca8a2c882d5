"""Chunks on disk at ``chunks/ab/cd/<id hex>`` (SwarmStore's CAS path transform).

A chunk is written to ``chunks/tmp/`` and renamed under its id, so no partial
chunk is ever visible under its id; leftovers in ``tmp/`` are removed at start.
Thread-safe: concurrent puts of one id both succeed and leave one file.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

from swarmfs.errors import ChunkMissing


class ChunkStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._fanout: set[str] = set()  # "ab/cd" directories known to exist

    def path(self, chunk_id: bytes) -> Path:
        name = chunk_id.hex()
        return self.root / name[:2] / name[2:4] / name

    def clean_tmp(self) -> int:
        """Remove half-written chunks of a previous run; returns how many."""
        n = 0
        for entry in self._tmp.iterdir():
            entry.unlink(missing_ok=True)
            n += 1
        return n

    def has(self, chunk_id: bytes) -> bool:
        return self.path(chunk_id).exists()

    def put(self, chunk_id: bytes, ciphertext: bytes, *, overwrite: bool = False) -> bool:
        """Store a chunk unless present; True if it was written now. ENOSPC propagates.

        ``overwrite``: write it even if present (a fetched copy replacing a local
        one that may be corrupt). The new file is renamed over the old one, so
        the id always names a whole file, and a failed write leaves the old one.
        """
        final = self.path(chunk_id)
        if not overwrite and final.exists():
            return False
        fanout = chunk_id.hex()[:2] + "/" + chunk_id.hex()[2:4]
        if fanout not in self._fanout:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._fanout.add(fanout)
        tmp = self._tmp / f"{chunk_id.hex()[:16]}.{secrets.token_hex(6)}"
        try:
            with open(tmp, "wb") as f:
                f.write(ciphertext)
            try:
                os.replace(tmp, final)
            except FileNotFoundError:  # a fan-out directory removed behind our back
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return True

    def get(self, chunk_id: bytes) -> bytes:
        try:
            with open(self.path(chunk_id), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ChunkMissing(f"chunk {chunk_id.hex()[:16]} is not stored here") from None

    def size(self, chunk_id: bytes) -> int:
        try:
            return self.path(chunk_id).stat().st_size
        except FileNotFoundError:
            return 0

    def delete(self, chunk_id: bytes) -> bool:
        try:
            self.path(chunk_id).unlink()
        except FileNotFoundError:
            return False
        return True

    def sync(self, chunk_ids: Iterable[bytes]) -> None:
        """Make chunks survive power loss: fsync each file and the directories it sits in."""
        dirs: set[Path] = set()
        for chunk_id in chunk_ids:
            p = self.path(chunk_id)
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dirs.update((p.parent, p.parent.parent))
        dirs.add(self.root)
        for d in dirs:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            except OSError as exc:  # some filesystems refuse fsync on directories
                if exc.errno != errno.EINVAL:
                    raise
            finally:
                os.close(fd)

    def ids(self) -> Iterator[bytes]:
        """Every stored chunk id (for fsck and GC)."""
        for top in self.root.iterdir():
            if top == self._tmp or not top.is_dir():
                continue
            for sub in top.iterdir():
                for f in sub.iterdir():
                    try:
                        yield bytes.fromhex(f.name)
                    except ValueError:
                        continue
