"""The node's SQLite database (WAL): records, block lists, inodes, trash, chunk inventory.

Concurrency contract: reads use ``Database.reader`` on the event-loop thread
(short indexed queries, autocommit, so they never hold a snapshot open); every
write is a function run by ``Database.write`` on one writer connection, one at a
time in a worker thread, inside ``BEGIN IMMEDIATE … COMMIT``. No ``await``
happens inside a transaction. Inode numbers come from an AUTOINCREMENT key and
are never reused. Version vectors are stored as JSON text.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from swarmfs.meta.records import Block, Kind, VersionVector, parent_of

T = TypeVar("T")

ROOT_INO = 1
HIDDEN_PARENT = b"\x00"  # parent of detached (unlinked-but-open) records: never listed or sent

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value                       -- index_id (random 64-bit), sequence (last change number)
);
CREATE TABLE IF NOT EXISTS records (
    rid         INTEGER PRIMARY KEY,
    path        BLOB NOT NULL UNIQUE,   -- relative, components joined by '/', root = x''
    parent      BLOB,                   -- parent path; NULL for the root, x'00' for hidden
    name        BLOB NOT NULL,
    kind        TEXT NOT NULL,          -- file, dir, symlink, fifo, socket
    mode        INTEGER NOT NULL,       -- permission bits (07777)
    uid         INTEGER NOT NULL,
    gid         INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    mtime_ns    INTEGER NOT NULL,
    ctime_ns    INTEGER NOT NULL,       -- local only: status change time on this node
    atime_ns    INTEGER NOT NULL,       -- local only
    target      BLOB NOT NULL DEFAULT x'',  -- symlink target
    version     TEXT NOT NULL,          -- version vector as JSON {node_id: counter}
    modified_by TEXT NOT NULL,
    deleted     INTEGER NOT NULL DEFAULT 0, -- tombstone
    sequence    INTEGER NOT NULL,       -- this node's change number of the last change
    bl          INTEGER,                -- block list id (files), shared with trash entries
    hidden      INTEGER NOT NULL DEFAULT 0  -- detached copy kept for an open inode; local only
);
CREATE INDEX IF NOT EXISTS records_children ON records(parent, deleted, rid);
CREATE INDEX IF NOT EXISTS records_sequence ON records(sequence);
CREATE TABLE IF NOT EXISTS blocklists (
    bl INTEGER PRIMARY KEY AUTOINCREMENT
);
CREATE TABLE IF NOT EXISTS blocks (
    bl       INTEGER NOT NULL,
    idx      INTEGER NOT NULL,          -- chunk number within the file
    chunk_id BLOB,                      -- NULL: a hole, reads as zeros
    h        BLOB,                      -- SHA-256 of the plaintext (binds the chunk key)
    length   INTEGER NOT NULL,          -- plaintext bytes stored; the rest of the extent is zeros
    PRIMARY KEY (bl, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blocks_chunk ON blocks(chunk_id);
CREATE TABLE IF NOT EXISTS inodes (
    ino INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused
    rid INTEGER NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS trash (
    tid        INTEGER PRIMARY KEY,
    path       BLOB NOT NULL,
    kind       TEXT NOT NULL,
    mode       INTEGER NOT NULL,
    size       INTEGER NOT NULL,
    mtime_ns   INTEGER NOT NULL,
    deleted_at REAL NOT NULL,          -- unix seconds on this node
    deleted_by TEXT NOT NULL,
    bl         INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS trash_bl ON trash(bl);
CREATE TABLE IF NOT EXISTS chunks (
    chunk_id  BLOB PRIMARY KEY,
    size      INTEGER NOT NULL,        -- ciphertext bytes on disk
    pinned    INTEGER NOT NULL,        -- 1: written here or held as a replica; 0: cache
    last_used REAL NOT NULL
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class Row:
    """A record as this node stores it, with its local-only columns."""

    rid: int
    path: bytes
    kind: Kind
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    atime_ns: int
    target: bytes
    version: VersionVector
    modified_by: str
    deleted: bool
    sequence: int
    bl: int | None
    hidden: bool

    @property
    def name(self) -> bytes:
        return self.path.rsplit(b"/", 1)[-1]


_ROW_COLUMNS = (
    "rid, path, kind, mode, uid, gid, size, mtime_ns, ctime_ns, atime_ns, target, version,"
    " modified_by, deleted, sequence, bl, hidden"
)


def _row(t: tuple) -> Row:
    return Row(
        rid=t[0],
        path=bytes(t[1]),
        kind=Kind(t[2]),
        mode=t[3],
        uid=t[4],
        gid=t[5],
        size=t[6],
        mtime_ns=t[7],
        ctime_ns=t[8],
        atime_ns=t[9],
        target=bytes(t[10]),
        version=VersionVector.of(json.loads(t[11])),
        modified_by=t[12],
        deleted=bool(t[13]),
        sequence=t[14],
        bl=t[15],
        hidden=bool(t[16]),
    )


def _vv(v: VersionVector) -> str:
    return json.dumps(v.as_dict(), sort_keys=True)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=OFF")
    return conn


def now_ns() -> int:
    return time.time_ns()


class Queries:
    """Read queries; shared by the reader connection and by write transactions."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def meta(self, key: str, default: object = None) -> object:
        r = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if r is None else r[0]

    def by_path(self, path: bytes) -> Row | None:
        r = self.conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM records WHERE path=?", (path,)
        ).fetchone()
        return None if r is None else _row(r)

    def by_rid(self, rid: int) -> Row | None:
        r = self.conn.execute(f"SELECT {_ROW_COLUMNS} FROM records WHERE rid=?", (rid,)).fetchone()
        return None if r is None else _row(r)

    def by_ino(self, ino: int) -> Row | None:
        r = self.conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM records WHERE rid=(SELECT rid FROM inodes WHERE ino=?)",
            (ino,),
        ).fetchone()
        return None if r is None else _row(r)

    def ino_of(self, rid: int) -> int | None:
        r = self.conn.execute("SELECT ino FROM inodes WHERE rid=?", (rid,)).fetchone()
        return None if r is None else r[0]

    def children(self, parent: bytes, after_rid: int, limit: int) -> list[Row]:
        rows = self.conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM records WHERE parent=? AND deleted=0 AND rid>?"
            " ORDER BY rid LIMIT ?",
            (parent, after_rid, limit),
        ).fetchall()
        return [_row(r) for r in rows]

    def has_children(self, parent: bytes) -> bool:
        r = self.conn.execute(
            "SELECT 1 FROM records WHERE parent=? AND deleted=0 LIMIT 1", (parent,)
        ).fetchone()
        return r is not None

    def count_subdirs(self, parent: bytes) -> int:
        r = self.conn.execute(
            "SELECT COUNT(*) FROM records WHERE parent=? AND deleted=0 AND kind='dir'", (parent,)
        ).fetchone()
        return r[0]

    def blocks(self, bl: int | None, first: int, last: int) -> dict[int, Block]:
        """Blocks ``first..last`` (inclusive) of a block list; absent indexes are holes."""
        if bl is None:
            return {}
        rows = self.conn.execute(
            "SELECT idx, chunk_id, h, length FROM blocks WHERE bl=? AND idx BETWEEN ? AND ?",
            (bl, first, last),
        ).fetchall()
        return {
            idx: Block(None if c is None else bytes(c), None if h is None else bytes(h), n)
            for idx, c, h, n in rows
        }

    def chunk_referenced(self, chunk_id: bytes) -> bool:
        r = self.conn.execute("SELECT 1 FROM blocks WHERE chunk_id=? LIMIT 1", (chunk_id,))
        return r.fetchone() is not None

    def count_files(self) -> int:
        r = self.conn.execute(
            "SELECT COUNT(*) FROM records WHERE deleted=0 AND hidden=0 AND kind!='dir'"
        ).fetchone()
        return r[0]

    def chunk_bytes(self) -> tuple[int, int]:
        """(bytes pinned, bytes cached) of the chunk inventory."""
        r = self.conn.execute(
            "SELECT COALESCE(SUM(CASE WHEN pinned THEN size END), 0),"
            " COALESCE(SUM(CASE WHEN pinned THEN 0 ELSE size END), 0) FROM chunks"
        ).fetchone()
        return r[0], r[1]

    def trash(self) -> list[tuple]:
        return self.conn.execute(
            "SELECT tid, path, kind, size, mtime_ns, deleted_at, deleted_by FROM trash"
            " ORDER BY deleted_at DESC"
        ).fetchall()


class Txn(Queries):
    """Write operations, valid inside one ``Database.write`` transaction."""

    def __init__(self, conn: sqlite3.Connection, node_id: str) -> None:
        super().__init__(conn)
        self.node_id = node_id
        self.changed_rids: list[int] = []

    def next_sequence(self) -> int:
        seq = int(self.meta("sequence", 0)) + 1  # type: ignore[arg-type]
        self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('sequence', ?)", (seq,))
        return seq

    def _set(self, rid: int, **cols: object) -> None:
        names = ", ".join(f"{k}=?" for k in cols)
        self.conn.execute(f"UPDATE records SET {names} WHERE rid=?", (*cols.values(), rid))

    def touch_dir(self, path: bytes, now: int) -> None:
        """A child was added or removed: mtime/ctime change on this node only (not replicated)."""
        self.conn.execute(
            "UPDATE records SET mtime_ns=?, ctime_ns=? WHERE path=? AND deleted=0", (now, now, path)
        )

    def new_inode(self, rid: int) -> int:
        return self.conn.execute("INSERT INTO inodes(rid) VALUES (?)", (rid,)).lastrowid  # type: ignore[return-value]

    def create(
        self,
        path: bytes,
        kind: Kind,
        mode: int,
        uid: int,
        gid: int,
        now: int,
        target: bytes = b"",
    ) -> tuple[int, int]:
        """A new live record at ``path`` (reviving its tombstone if any); returns (rid, ino)."""
        old = self.by_path(path)
        version = (old.version if old else VersionVector()).bump(self.node_id)
        seq = self.next_sequence()
        bl = self.new_blocklist() if kind == Kind.FILE else None
        size = len(target) if kind == Kind.SYMLINK else 0
        values = dict(
            kind=kind.value, mode=mode, uid=uid, gid=gid, size=size, mtime_ns=now, ctime_ns=now,
            atime_ns=now, target=target, version=_vv(version), modified_by=self.node_id,
            deleted=0, sequence=seq, bl=bl, hidden=0,
        )  # fmt: skip
        if old is not None:
            assert old.deleted, "create over a live record"
            self._set(old.rid, **values)
            rid = old.rid
        else:
            rid = self.conn.execute(
                "INSERT INTO records(path, parent, name, kind, mode, uid, gid, size, mtime_ns,"
                " ctime_ns, atime_ns, target, version, modified_by, deleted, sequence, bl, hidden)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (path, parent_of(path), path.rsplit(b"/", 1)[-1], *values.values()),
            ).lastrowid
        self.touch_dir(parent_of(path), now)
        self.changed_rids.append(rid)  # type: ignore[arg-type]
        return rid, self.new_inode(rid)  # type: ignore[arg-type]

    def new_blocklist(self) -> int:
        return self.conn.execute("INSERT INTO blocklists DEFAULT VALUES").lastrowid  # type: ignore[return-value]

    def update_attrs(self, rid: int, now: int, **attrs: object) -> None:
        """chmod/chown/utimens on a live record: a replicated change (version bump)."""
        row = self.by_rid(rid)
        assert row is not None
        cols: dict[str, object] = dict(attrs, ctime_ns=now)
        if not row.hidden:
            cols.update(
                version=_vv(row.version.bump(self.node_id)),
                modified_by=self.node_id,
                sequence=self.next_sequence(),
            )
            self.changed_rids.append(rid)
        self._set(rid, **cols)

    def own_blocklist(self, row: Row) -> int:
        """The row's block list, copied first if the trash shares it (copy on write)."""
        if row.bl is None:
            bl = self.new_blocklist()
            self._set(row.rid, bl=bl)
            return bl
        shared = self.conn.execute("SELECT 1 FROM trash WHERE bl=? LIMIT 1", (row.bl,)).fetchone()
        shared = (
            shared
            or self.conn.execute(
                "SELECT 1 FROM records WHERE bl=? AND rid!=? LIMIT 1", (row.bl, row.rid)
            ).fetchone()
        )
        if not shared:
            return row.bl
        bl = self.new_blocklist()
        self.conn.execute(
            "INSERT INTO blocks(bl, idx, chunk_id, h, length)"
            " SELECT ?, idx, chunk_id, h, length FROM blocks WHERE bl=?",
            (bl, row.bl),
        )
        self._set(row.rid, bl=bl)
        return bl

    def commit_content(
        self,
        rid: int,
        size: int,
        mtime_ns: int,
        now: int,
        changed: dict[int, Block],
        keep: int,
        chunk_count: int,
        new_chunks: Iterable[tuple[bytes, int]],
    ) -> list[bytes]:
        """Write a file version: changed blocks, size, mtime; returns chunks now unreferenced.

        Committed blocks from index ``keep`` on are dropped (truncated away), then
        ``changed`` blocks below ``chunk_count`` (the new size's slot count) are
        written. ``new_chunks`` are (id, ciphertext size) just stored here.
        """
        row = self.by_rid(rid)
        assert row is not None
        bl = self.own_blocklist(row)
        old_ids = {
            bytes(c)
            for (c,) in self.conn.execute(
                "SELECT chunk_id FROM blocks WHERE bl=? AND chunk_id IS NOT NULL"
                " AND (idx>=? OR idx IN (SELECT value FROM json_each(?)))",
                (bl, keep, json.dumps(sorted(changed))),
            )
        }
        self.conn.execute("DELETE FROM blocks WHERE bl=? AND idx>=?", (bl, keep))
        self.conn.executemany(
            "INSERT OR REPLACE INTO blocks(bl, idx, chunk_id, h, length) VALUES (?,?,?,?,?)",
            [(bl, i, b.chunk_id, b.h, b.length) for i, b in changed.items() if i < chunk_count],
        )
        t = time.time()
        self.conn.executemany(
            "INSERT OR IGNORE INTO chunks(chunk_id, size, pinned, last_used) VALUES (?,?,1,?)",
            [(c, n, t) for c, n in new_chunks],
        )
        cols: dict[str, object] = dict(size=size, mtime_ns=mtime_ns, ctime_ns=now)
        if not row.hidden:
            cols.update(
                version=_vv(row.version.bump(self.node_id)),
                modified_by=self.node_id,
                sequence=self.next_sequence(),
            )
            self.changed_rids.append(rid)
        self._set(rid, **cols)
        return self.drop_unreferenced(old_ids)

    def drop_unreferenced(self, chunk_ids: Iterable[bytes]) -> list[bytes]:
        """Forget inventory rows of chunks no block list references; returns them for deletion."""
        gone = [c for c in chunk_ids if not self.chunk_referenced(c)]
        self.conn.executemany("DELETE FROM chunks WHERE chunk_id=?", [(c,) for c in gone])
        return gone

    def detach(self, row: Row, ino: int) -> None:
        """Move an open inode off ``row`` onto a hidden copy, so it outlives the path."""
        hidden_path = HIDDEN_PARENT + b"/" + str(ino).encode()
        self.conn.execute("DELETE FROM records WHERE path=?", (hidden_path,))
        hid = self.conn.execute(
            "INSERT INTO records(path, parent, name, kind, mode, uid, gid, size, mtime_ns,"
            " ctime_ns, atime_ns, target, version, modified_by, deleted, sequence, bl, hidden)"
            " SELECT ?, ?, name, kind, mode, uid, gid, size, mtime_ns, ctime_ns, atime_ns,"
            " target, version, modified_by, 0, 0, bl, 1 FROM records WHERE rid=?",
            (hidden_path, HIDDEN_PARENT, row.rid),
        ).lastrowid
        self.conn.execute("UPDATE inodes SET rid=? WHERE ino=?", (hid, ino))

    def delete(self, row: Row, now: int, keep_ino: int | None) -> None:
        """Turn a live record into a tombstone; its content goes to the trash.

        ``keep_ino``: the kernel still knows the inode, so it moves to a hidden copy.
        """
        if keep_ino is not None:
            self.detach(row, keep_ino)
        else:
            self.conn.execute("DELETE FROM inodes WHERE rid=?", (row.rid,))
        if row.kind == Kind.FILE and row.bl is not None:
            self.conn.execute(
                "INSERT INTO trash(path, kind, mode, size, mtime_ns, deleted_at, deleted_by, bl)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (row.path, row.kind.value, row.mode, row.size, row.mtime_ns, now / 1e9,
                 self.node_id, row.bl),
            )  # fmt: skip
        self._set(
            row.rid,
            deleted=1,
            bl=None,
            size=0,
            mtime_ns=now,
            ctime_ns=now,
            version=_vv(row.version.bump(self.node_id)),
            modified_by=self.node_id,
            sequence=self.next_sequence(),
        )
        self.touch_dir(parent_of(row.path), now)
        self.changed_rids.append(row.rid)

    def move(self, src: Row, new_path: bytes, now: int) -> None:
        """Rename: the record (and, for a directory, every live descendant) moves to
        ``new_path`` keeping its rid, so inodes follow; each old path gets a tombstone.
        A tombstone already at a destination path is absorbed into the new version."""
        old_prefix = src.path
        movers = [src]
        if src.kind == Kind.DIR:
            lo, hi = old_prefix + b"/", old_prefix + b"0"
            movers += [
                _row(r)
                for r in self.conn.execute(
                    f"SELECT {_ROW_COLUMNS} FROM records WHERE path>=? AND path<? AND deleted=0"
                    " AND hidden=0 ORDER BY path",
                    (lo, hi),
                )
            ]
        for r in movers:
            dest = new_path + r.path[len(old_prefix) :]
            existing = self.by_path(dest)
            base = VersionVector()
            if existing is not None:
                assert existing.deleted, "move over a live record"
                base = existing.version
                self.conn.execute("DELETE FROM records WHERE rid=?", (existing.rid,))
            seq = self.next_sequence()
            self._set(
                r.rid,
                path=dest,
                parent=parent_of(dest),
                name=dest.rsplit(b"/", 1)[-1],
                version=_vv(base.merge(r.version).bump(self.node_id)),
                modified_by=self.node_id,
                ctime_ns=now,
                sequence=seq,
            )
            tomb = self.conn.execute(
                "INSERT INTO records(path, parent, name, kind, mode, uid, gid, size, mtime_ns,"
                " ctime_ns, atime_ns, target, version, modified_by, deleted, sequence, bl, hidden)"
                " VALUES (?,?,?,?,?,?,?,0,?,?,?,x'',?,?,1,?,NULL,0)",
                (r.path, parent_of(r.path), r.name, r.kind.value, r.mode, r.uid, r.gid, now, now,
                 now, _vv(r.version.bump(self.node_id)), self.node_id, seq),
            ).lastrowid  # fmt: skip
            self.changed_rids += [r.rid, tomb]  # type: ignore[list-item]
        self.touch_dir(parent_of(old_prefix), now)
        self.touch_dir(parent_of(new_path), now)

    def forget_hidden(self, ino: int) -> list[bytes]:
        """The kernel forgot a detached inode: drop it and its unshared chunks."""
        row = self.by_ino(ino)
        self.conn.execute("DELETE FROM inodes WHERE ino=?", (ino,))
        if row is None or not row.hidden:
            return []
        self.conn.execute("DELETE FROM records WHERE rid=?", (row.rid,))
        return self.drop_blocklist_if_unused(row.bl)

    def drop_blocklist_if_unused(self, bl: int | None) -> list[bytes]:
        if bl is None:
            return []
        used = self.conn.execute(
            "SELECT 1 FROM records WHERE bl=? UNION ALL SELECT 1 FROM trash WHERE bl=? LIMIT 1",
            (bl, bl),
        ).fetchone()
        if used:
            return []
        ids = {
            bytes(c)
            for (c,) in self.conn.execute(
                "SELECT chunk_id FROM blocks WHERE bl=? AND chunk_id IS NOT NULL", (bl,)
            )
        }
        self.conn.execute("DELETE FROM blocks WHERE bl=?", (bl,))
        return self.drop_unreferenced(ids)

    def expire_trash(self, before: float) -> list[bytes]:
        """Drop trash entries deleted before ``before``; returns chunks now unreferenced."""
        gone: list[bytes] = []
        for tid, bl in self.conn.execute(
            "SELECT tid, bl FROM trash WHERE deleted_at<?", (before,)
        ).fetchall():
            self.conn.execute("DELETE FROM trash WHERE tid=?", (tid,))
            gone += self.drop_blocklist_if_unused(bl)
        return gone

    def drop_hidden(self) -> list[bytes]:
        """At start-up no inode is open: remove every detached copy."""
        gone: list[bytes] = []
        for rid, bl in self.conn.execute("SELECT rid, bl FROM records WHERE hidden=1").fetchall():
            self.conn.execute("DELETE FROM inodes WHERE rid=?", (rid,))
            self.conn.execute("DELETE FROM records WHERE rid=?", (rid,))
            gone += self.drop_blocklist_if_unused(bl)
        return gone


class Database:
    """Owns the connections; ``reader`` for queries, ``write(fn)`` for transactions."""

    def __init__(self, path: Path, node_id: str) -> None:
        self.path = path
        self.node_id = node_id
        self._writer = _connect(path)
        self._writer.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(1)
        self.reader = Queries(_connect(path))
        self._init_root()

    def _init_root(self) -> None:
        def init(txn: Txn) -> None:
            if txn.meta("index_id") is None:
                txn.conn.execute(
                    "INSERT INTO meta(key, value) VALUES ('index_id', ?)", (secrets.randbits(63),)
                )
            if txn.by_path(b"") is None:
                now = now_ns()
                rid = txn.conn.execute(
                    "INSERT INTO records(path, parent, name, kind, mode, uid, gid, size, mtime_ns,"
                    " ctime_ns, atime_ns, version, modified_by, sequence)"
                    " VALUES (x'', NULL, x'', 'dir', ?, 0, 0, 0, ?, ?, ?, '{}', ?, 0)",
                    (0o755, now, now, now, self.node_id),
                ).lastrowid
                ino = txn.new_inode(rid)  # type: ignore[arg-type]
                assert ino == ROOT_INO, "root must be inode 1"

        self.write_sync(init)

    def write_sync(self, fn: Callable[[Txn], T]) -> T:
        """Run ``fn`` in one transaction on the calling thread (start-up, tools, the writer)."""
        with self._lock:
            txn = Txn(self._writer, self.node_id)
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                result = fn(txn)
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            self._writer.execute("COMMIT")
            return result

    async def write(self, fn: Callable[[Txn], T]) -> T:
        """Run ``fn`` in one transaction on the writer thread; the event loop only waits."""
        return await trio.to_thread.run_sync(self.write_sync, fn, limiter=self._limiter)

    def fsync_sync(self) -> None:
        """Make every committed transaction survive power loss: fsync the WAL.

        Commits run with ``synchronous=NORMAL`` (no fsync per transaction, so
        ``close()`` stays fast); ``fsync()`` on a file calls this.
        """
        with self._lock:
            for suffix in ("-wal", ""):
                try:
                    fd = os.open(str(self.path) + suffix, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def close(self) -> None:
        self.reader.conn.close()
        self._writer.close()
