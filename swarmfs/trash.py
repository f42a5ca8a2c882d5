"""The trash: deleted files kept for a retention period, listed and restored.

A local delete, or one applied from a peer, turns the record into a tombstone
and moves its block list into the ``trash`` table (``meta/db.py``), so the
chunks stay referenced and GC keeps them. ``restore`` writes a new live record
with that block list at the old path, bumping the version over the tombstone:
a local change like any write, so it replicates to every node and wins over
the delete everywhere. The entry then leaves this node's trash; other nodes
keep their own entry until it expires.

Only files have content to keep: directories, symlinks and special files come
back by being recreated (a restored file brings back its missing parent
directories).

Expiry (``trash_retention``, default 7 days; 0 turns the trash off) is the
node's garbage collector's job (``swarmfs/gc.py``, ``Txn.expire_trash``).

The same functions serve the CLI offline (holding the data dir's lock) and a
running node's control handlers ``trash_list``/``trash_restore``; the
transaction functions run on the database's writer thread, never awaiting.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarmfs.datadir import DataDir
from swarmfs.errors import UserError
from swarmfs.meta.db import Database, Queries, Txn, _connect, now_ns
from swarmfs.meta.records import Kind, parent_of


@dataclass(frozen=True)
class Entry:
    """One deletion in the trash, as ``trash list`` shows it."""

    path: str
    kind: str
    size: int
    mtime_ns: int
    deleted_at: float
    deleted_by: str

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def display_path(path: bytes) -> str:
    """A swarm path for people: undecodable bytes escaped, never an exception."""
    return path.decode("utf-8", "backslashreplace")


def entries(q: Queries) -> list[Entry]:
    """Every trash entry, the most recent deletion first."""
    return [
        Entry(display_path(bytes(path)), kind, size, mtime_ns, deleted_at, deleted_by)
        for _tid, path, kind, size, mtime_ns, deleted_at, deleted_by in q.trash()
    ]


def swarm_path(text: str, mountpoint: Path | None) -> bytes:
    """``a/b``, ``/a/b`` or ``MOUNTPOINT/a/b`` → the swarm path ``a/b``."""
    if mountpoint is not None and os.path.isabs(text):
        # realpath: MOUNTPOINT may be reached through a symlink; the path itself
        # need not exist (it was deleted).
        full = Path(os.path.realpath(text))
        if full.is_relative_to(mountpoint):
            text = str(full.relative_to(mountpoint))
    parts = [part for part in text.split("/") if part]
    if not parts:
        raise UserError("trash restore needs the path of a deleted file, e.g. photos/a.jpg")
    if any(part in (".", "..") for part in parts):
        raise UserError(f"{text}: '.' and '..' are not allowed in a swarm path")
    return os.fsencode("/".join(parts))


def restore_fn(path: bytes) -> Callable[[Txn], list[tuple[bytes, bytes, int | None, bool]]]:
    """The transaction that restores ``path``; it returns the kernel invalidations.

    Checked inside the transaction, so a concurrent write cannot slip in
    between the check and the restore.
    """
    shown = display_path(path)

    def txn(t: Txn) -> list[tuple[bytes, bytes, int | None, bool]]:
        tid = t.newest_trash_entry(path)
        if tid is None:
            raise UserError(f"{shown} is not in the trash (see: swarmfs trash list)")
        live = t.by_path(path)
        if live is not None and not live.deleted:
            raise UserError(f"{shown} exists; move it away first to restore the deleted one")
        parent = parent_of(path)
        while parent:
            row = t.by_path(parent)
            if row is not None and not row.deleted and row.kind != Kind.DIR:
                raise UserError(
                    f"cannot restore {shown}: {display_path(parent)} is not a directory"
                )
            parent = parent_of(parent)
        t.restore_trash(tid, now_ns())
        return t.invalidations

    return txn


# --- offline, for the CLI when no node runs on the data dir ---


def list_offline(data_dir: DataDir) -> list[Entry]:
    if not data_dir.db_file.exists():
        return []
    q = Queries(_connect(data_dir.db_file))
    try:
        return entries(q)
    finally:
        q.conn.close()


def restore_offline(data_dir: DataDir, path: bytes) -> None:
    """Restore under the data dir's lock; peers get the change when the node next runs."""
    if not data_dir.db_file.exists():
        raise UserError(f"{display_path(path)} is not in the trash (see: swarmfs trash list)")
    with data_dir.acquire_lock():
        db = Database(data_dir.db_file, data_dir.identity().node_id)
        try:
            db.write_sync(restore_fn(path))
        finally:
            db.close()
