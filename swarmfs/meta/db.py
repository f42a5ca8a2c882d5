"""The node's SQLite database (WAL): records, block lists, inodes, trash, chunk inventory.

Concurrency contract: reads use ``Database.reader`` on the event-loop thread
(short indexed queries, autocommit, so they never hold a snapshot open); every
write is a function run by ``Database.write`` on one writer connection, one at a
time in a worker thread, inside ``BEGIN IMMEDIATE … COMMIT``. No ``await``
happens inside a transaction. Inode numbers come from an AUTOINCREMENT key and
are never reused. Version vectors are stored as JSON text.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
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

from swarmfs.meta.merge import resolve
from swarmfs.meta.records import Block, Kind, Record, VersionVector, parent_of

T = TypeVar("T")
log = logging.getLogger(__name__)

ROOT_INO = 1
HOLE = Block(None, None, 0)
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
-- nlink of directories; partial, so that a change to a file touches one index page less
DROP INDEX IF EXISTS records_kinds;
CREATE INDEX IF NOT EXISTS records_subdirs ON records(parent, deleted) WHERE kind='dir';
CREATE INDEX IF NOT EXISTS records_bl ON records(bl) WHERE bl IS NOT NULL;
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
CREATE TABLE IF NOT EXISTS peer_index (
    node_id  TEXT NOT NULL,
    index_id INTEGER NOT NULL,         -- the peer's database identity; a new one restarts at 0
    sequence INTEGER NOT NULL,         -- last of its changes applied here, advanced contiguously
    PRIMARY KEY (node_id, index_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS peers (
    node_id   TEXT PRIMARY KEY,        -- from the peer's certificate
    address   TEXT NOT NULL,           -- where it last listened, host:port
    last_seen REAL                     -- unix seconds
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS push_queue (
    chunk_id BLOB PRIMARY KEY,         -- written here, not yet on enough peers
    size     INTEGER NOT NULL,
    added    REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS push_queue_added ON push_queue(added);
CREATE TABLE IF NOT EXISTS holders (
    chunk_id BLOB NOT NULL,            -- peers known to hold a chunk (acknowledged pushes)
    node_id  TEXT NOT NULL,
    PRIMARY KEY (chunk_id, node_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    chunk_id  BLOB PRIMARY KEY,
    size      INTEGER NOT NULL,        -- ciphertext bytes on disk
    pinned    INTEGER NOT NULL,        -- 2: written here; 1: held as a replica; 0: cache
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

_ROW_COLUMNS_OF_RECORDS = ", ".join(f"records.{c.strip()}" for c in _ROW_COLUMNS.split(","))


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
        version=_parse_vv(t[11]),
        modified_by=t[12],
        deleted=bool(t[13]),
        sequence=t[14],
        bl=t[15],
        hidden=bool(t[16]),
    )


@functools.lru_cache(maxsize=4096)
def _parse_vv(text: str) -> VersionVector:
    """Version vectors repeat across rows and reads (they are immutable, so one parse
    serves all): parsing JSON for every row read was a tenth of a metadata request."""
    return VersionVector.of(json.loads(text))


def _vv(v: VersionVector) -> str:
    return json.dumps(v.as_dict(), sort_keys=True)


CHECKPOINT_EVERY = 64  # writes between WAL checkpoints (a create adds ~13 pages to the WAL)


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

    def entry(self, path: bytes) -> tuple[Row, int] | None:
        """The live record at ``path`` and its inode, from one statement: two would each
        see their own snapshot, and a remote change committed between them would pair
        the new inode with the old version's attributes."""
        r = self.conn.execute(
            f"SELECT {_ROW_COLUMNS_OF_RECORDS}, inodes.ino FROM records"
            " JOIN inodes ON inodes.rid=records.rid WHERE records.path=? AND records.deleted=0",
            (path,),
        ).fetchone()
        return None if r is None else (_row(r), r[-1])

    def entries(self, parent: bytes, after_rid: int, limit: int) -> list[tuple[Row, int]]:
        """Live children after ``after_rid`` with their inodes, in one statement (see
        ``entry``)."""
        rows = self.conn.execute(
            f"SELECT {_ROW_COLUMNS_OF_RECORDS}, inodes.ino FROM records"
            " JOIN inodes ON inodes.rid=records.rid"
            " WHERE records.parent=? AND records.deleted=0 AND records.rid>?"
            " ORDER BY records.rid LIMIT ?",
            (parent, after_rid, limit),
        ).fetchall()
        return [(_row(r), r[-1]) for r in rows]

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

    def known_peers(self) -> list[tuple[str, str, float | None]]:
        return self.conn.execute("SELECT node_id, address, last_seen FROM peers").fetchall()

    def hidden_inodes(self) -> list[int]:
        return [
            i
            for (i,) in self.conn.execute(
                "SELECT ino FROM inodes WHERE rid IN (SELECT rid FROM records WHERE hidden=1)"
            )
        ]

    def push_batch(self, limit: int) -> list[tuple[bytes, int]]:
        rows = self.conn.execute(
            "SELECT chunk_id, size FROM push_queue ORDER BY added LIMIT ?", (limit,)
        ).fetchall()
        return [(bytes(c), n) for c, n in rows]

    def backlog(self) -> tuple[int, int]:
        r = self.conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM push_queue").fetchone()
        return r[0], r[1]

    def unreplicated(self) -> int:
        """Queued chunks that no peer holds yet (what ``umount`` waits for)."""
        r = self.conn.execute(
            "SELECT COUNT(*) FROM push_queue WHERE NOT EXISTS"
            " (SELECT 1 FROM holders WHERE holders.chunk_id=push_queue.chunk_id)"
        ).fetchone()
        return r[0]

    def holders(self, chunk_id: bytes) -> set[str]:
        rows = self.conn.execute("SELECT node_id FROM holders WHERE chunk_id=?", (chunk_id,))
        return {r[0] for r in rows}

    def trash(self) -> list[tuple]:
        return self.conn.execute(
            "SELECT tid, path, kind, size, mtime_ns, deleted_at, deleted_by FROM trash"
            " ORDER BY deleted_at DESC"
        ).fetchall()

    def all_blocks(self, bl: int | None) -> tuple[Block, ...]:
        """The dense block list (holes filled in) up to the last stored block."""
        if bl is None:
            return ()
        rows = self.conn.execute(
            "SELECT idx, chunk_id, h, length FROM blocks WHERE bl=? ORDER BY idx", (bl,)
        ).fetchall()
        out: list[Block] = []
        for idx, c, h, n in rows:
            out.extend(HOLE for _ in range(idx - len(out)))
            out.append(Block(None if c is None else bytes(c), None if h is None else bytes(h), n))
        return tuple(out)

    def record(self, row: Row) -> Record:
        """The replicated form of a row (local-only columns dropped)."""
        return Record(
            path=row.path,
            kind=row.kind,
            mode=row.mode,
            uid=row.uid,
            gid=row.gid,
            size=row.size,
            mtime_ns=row.mtime_ns,
            version=row.version,
            modified_by=row.modified_by,
            deleted=row.deleted,
            target=row.target,
            blocks=self.all_blocks(row.bl) if row.kind == Kind.FILE and not row.deleted else (),
        )

    def changes_since_records(self, sequence: int, limit: int) -> list[tuple[Row, Record]]:
        """Changed rows with their replicated form, read in one snapshot: the writer
        thread may commit between two queries, and a row's size must match its blocks."""
        self.conn.execute("BEGIN")
        try:
            rows = self.changes_since(sequence, limit)
            return [(row, self.record(row)) for row in rows]
        finally:
            self.conn.execute("COMMIT")

    def changes_since(self, sequence: int, limit: int) -> list[Row]:
        rows = self.conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM records WHERE sequence>? AND hidden=0 AND path!=x''"
            " ORDER BY sequence LIMIT ?",
            (sequence, limit),
        ).fetchall()
        return [_row(r) for r in rows]

    def sequence(self) -> int:
        return int(self.meta("sequence", 0))  # type: ignore[arg-type]

    def index_id(self) -> int:
        return int(self.meta("index_id"))  # type: ignore[arg-type]

    def peer_sequence(self, node_id: str, index_id: int) -> int:
        r = self.conn.execute(
            "SELECT sequence FROM peer_index WHERE node_id=? AND index_id=?", (node_id, index_id)
        ).fetchone()
        return 0 if r is None else r[0]

    # --- trash and integrity checks (swarmfs/trash.py, swarmfs/fsck.py) ---

    def newest_trash_entry(self, path: bytes) -> int | None:
        """The tid of the most recent deletion of ``path`` still in the trash."""
        r = self.conn.execute(
            "SELECT tid FROM trash WHERE path=? ORDER BY deleted_at DESC, tid DESC LIMIT 1",
            (path,),
        ).fetchone()
        return None if r is None else r[0]

    def check_records(self) -> list[tuple]:
        """Raw (rid, path, parent, name, kind, deleted, hidden, bl, version) of every record,
        untyped, so a damaged row is reported rather than raising."""
        return self.conn.execute(
            "SELECT rid, path, parent, name, kind, deleted, hidden, bl, version FROM records"
        ).fetchall()

    def check_inventory(self) -> dict[bytes, int]:
        """chunk id → ciphertext size, as the inventory says."""
        return {bytes(c): n for c, n in self.conn.execute("SELECT chunk_id, size FROM chunks")}

    def chunk_hashes(self, chunk_id: bytes) -> set[bytes | None]:
        """The plaintext hashes block rows give for one chunk (more than one is damage)."""
        rows = self.conn.execute("SELECT DISTINCT h FROM blocks WHERE chunk_id=?", (chunk_id,))
        return {None if h is None else bytes(h) for (h,) in rows}

    def check_blocks(self, chunk_size: int) -> list[tuple[str, object]]:
        """Block-list damage: (kind of problem, subject) pairs."""
        problems: list[tuple[str, object]] = []
        for bl, n in self.conn.execute(
            "SELECT bl, COUNT(*) FROM blocks WHERE bl NOT IN (SELECT bl FROM blocklists)"
            " GROUP BY bl"
        ):
            problems.append(("blocks of a missing block list", (bl, n)))
        for bl, n in self.conn.execute(
            "SELECT bl, COUNT(*) FROM blocks WHERE bl NOT IN (SELECT bl FROM records"
            " WHERE bl IS NOT NULL) AND bl NOT IN (SELECT bl FROM trash) GROUP BY bl"
        ):
            problems.append(("unused block list", (bl, n)))
        for path, idx in self.conn.execute(
            "SELECT r.path, b.idx FROM records r JOIN blocks b ON b.bl=r.bl"
            " WHERE r.kind='file' AND (b.idx * ?) >= r.size",
            (chunk_size,),
        ):
            problems.append(("block past the end of the file", (bytes(path), idx)))
        for path, idx in self.conn.execute(
            "SELECT r.path, b.idx FROM records r JOIN blocks b ON b.bl=r.bl"
            " WHERE b.length<0 OR b.length>? OR (b.chunk_id IS NULL) != (b.h IS NULL)",
            (chunk_size,),
        ):
            problems.append(("malformed block", (bytes(path), idx)))
        for tid, path in self.conn.execute(
            "SELECT tid, path FROM trash WHERE bl NOT IN (SELECT bl FROM blocklists)"
        ):
            problems.append(("trash entry without its block list", (tid, bytes(path))))
        for (ino,) in self.conn.execute(
            "SELECT ino FROM inodes WHERE rid NOT IN (SELECT rid FROM records)"
        ):
            problems.append(("inode of a missing record", ino))
        return problems


class Txn(Queries):
    """Write operations, valid inside one ``Database.write`` transaction."""

    def __init__(self, conn: sqlite3.Connection, node_id: str, push: bool = True) -> None:
        super().__init__(conn)
        self.node_id = node_id
        self.push_new_chunks = push  # False with --replicas 1: nothing is ever pushed
        self.invalidations: list[tuple[bytes, bytes, int | None, bool]] = []
        self.last_sequence: int | None = None  # the newest change numbered here
        self.on_rollback: list[Callable[[], None]] = []
        """Undo what the transaction told others about, should it not commit."""
        self.received: list[int] = []
        """Sequences of records ``apply_remote`` stored exactly as the peer sent them
        (not merged, not a conflict copy): the peer has these, no need to announce back."""

    def next_sequence(self) -> int:
        seq = int(self.meta("sequence", 0)) + 1  # type: ignore[arg-type]
        self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('sequence', ?)", (seq,))
        self.last_sequence = seq
        return seq

    def _set(self, rid: int, **cols: object) -> None:
        names = ", ".join(f"{k}=?" for k in cols)
        self.conn.execute(f"UPDATE records SET {names} WHERE rid=?", (*cols.values(), rid))

    def _local_change(self, version: VersionVector) -> dict[str, object]:
        """Columns of a change made on this node: its counter bumped, a new sequence."""
        return dict(
            version=_vv(version.bump(self.node_id)),
            modified_by=self.node_id,
            sequence=self.next_sequence(),
        )

    def _upsert(self, path: bytes, existing: Row | None, **values: object) -> int:
        """Write the record at ``path``: over ``existing`` (its rid kept), else a new row."""
        if existing is not None:
            self._set(existing.rid, **values)
            return existing.rid
        cols: dict[str, object] = dict(
            path=path, parent=parent_of(path), name=path.rsplit(b"/", 1)[-1],
            size=0, target=b"", deleted=0, bl=None, hidden=0,
        )  # fmt: skip
        cols.update(values)
        cols.setdefault("atime_ns", cols["mtime_ns"])
        names, marks = ", ".join(cols), ", ".join("?" * len(cols))
        sql = f"INSERT INTO records({names}) VALUES ({marks})"
        return self.conn.execute(sql, tuple(cols.values())).lastrowid  # type: ignore[return-value]

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
        assert old is None or old.deleted, "create over a live record"
        rid = self._upsert(
            path,
            old,
            kind=kind.value,
            mode=mode,
            uid=uid,
            gid=gid,
            size=len(target) if kind == Kind.SYMLINK else 0,
            mtime_ns=now,
            ctime_ns=now,
            atime_ns=now,
            target=target,
            deleted=0,
            bl=self.new_blocklist() if kind == Kind.FILE else None,
            hidden=0,
            **self._local_change(old.version if old else VersionVector()),
        )
        self.touch_dir(parent_of(path), now)
        return rid, self.new_inode(rid)  # type: ignore[arg-type]

    def new_blocklist(self) -> int:
        return self.conn.execute("INSERT INTO blocklists DEFAULT VALUES").lastrowid  # type: ignore[return-value]

    def update_attrs(self, rid: int, now: int, **attrs: object) -> None:
        """chmod/chown/utimens on a live record: a replicated change (version bump)."""
        row = self.by_rid(rid)
        assert row is not None
        cols: dict[str, object] = dict(attrs, ctime_ns=now)
        if not row.hidden:
            cols.update(self._local_change(row.version))
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
        written. ``new_chunks`` are (id, ciphertext size) stored since the last
        commit; those the version does not use were superseded and are dropped.
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
        used = {b.chunk_id for i, b in changed.items() if i < chunk_count}
        stale = {c for c, _ in new_chunks if c not in used}  # superseded before this commit
        new_chunks = [(c, n) for c, n in new_chunks if c in used]
        self.conn.executemany(
            "INSERT INTO chunks(chunk_id, size, pinned, last_used) VALUES (?,?,2,?)"
            " ON CONFLICT(chunk_id) DO UPDATE SET pinned=2",
            [(c, n, t) for c, n in new_chunks],
        )
        if self.push_new_chunks:
            self.conn.executemany(
                "INSERT OR IGNORE INTO push_queue(chunk_id, size, added) VALUES (?,?,?)",
                [(c, n, t) for c, n in new_chunks],
            )
        cols: dict[str, object] = dict(size=size, mtime_ns=mtime_ns, ctime_ns=now)
        if not row.hidden:
            cols.update(self._local_change(row.version))
        self._set(rid, **cols)
        return self.drop_unreferenced(stale - old_ids) + self.supersede(old_ids)

    def drop_unreferenced(self, chunk_ids: Iterable[bytes]) -> list[bytes]:
        """Forget inventory rows of chunks no block list references; returns them for deletion."""
        gone = self._unreferenced(chunk_ids)
        for table in ("chunks", "push_queue", "holders"):
            self.conn.executemany(f"DELETE FROM {table} WHERE chunk_id=?", gone)
        return [c for (c,) in gone]

    def supersede(self, chunk_ids: Iterable[bytes]) -> list[bytes]:
        """Chunks of a committed version that was replaced: retired while this node
        knows a peer (which may have seen that version), else returned for deletion."""
        if self.conn.execute("SELECT 1 FROM peers LIMIT 1").fetchone() is None:
            return self.drop_unreferenced(chunk_ids)
        self.retire(chunk_ids)
        return []

    def retire(self, chunk_ids: Iterable[bytes]) -> None:
        """Chunks of a committed version that nothing references any more.

        That version was announced, so a peer may be reading it right now (an open
        handle keeps its version) and fetch these from here: they are not deleted
        but become cache, evicted least-recently-used past ``--cache-size`` or
        reclaimed by GC after its grace period; nor are they pushed any more.
        """
        gone = self._unreferenced(chunk_ids)
        now = time.time()
        self.conn.executemany(
            "UPDATE chunks SET pinned=0, last_used=? WHERE chunk_id=?", [(now, c) for (c,) in gone]
        )
        self.conn.executemany("DELETE FROM push_queue WHERE chunk_id=?", gone)

    def _unreferenced(self, chunk_ids: Iterable[bytes]) -> list[tuple[bytes]]:
        """``(id,)`` rows, for executemany, of the chunks no block list references."""
        return [(c,) for c in chunk_ids if not self.chunk_referenced(c)]

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
        self._to_trash(row, now, self.node_id)
        self._set(
            row.rid,
            deleted=1,
            bl=None,
            size=0,
            mtime_ns=now,
            ctime_ns=now,
            **self._local_change(row.version),
        )
        self.touch_dir(parent_of(row.path), now)

    def _to_trash(self, row: Row, now: int, deleted_by: str) -> None:
        """A deleted file's content stays restorable for the retention period."""
        if row.kind == Kind.FILE and row.bl is not None:
            self.conn.execute(
                "INSERT INTO trash(path, kind, mode, size, mtime_ns, deleted_at, deleted_by, bl)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (row.path, row.kind.value, row.mode, row.size, row.mtime_ns, now / 1e9,
                 deleted_by, row.bl),
            )  # fmt: skip

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
        for r in movers:  # parents first, so receivers never see a child without its parent
            dest = new_path + r.path[len(old_prefix) :]
            existing = self.by_path(dest)
            base = VersionVector()
            if existing is not None:
                assert existing.deleted, "move over a live record"
                base = existing.version
                self.conn.execute("DELETE FROM records WHERE rid=?", (existing.rid,))
            self._set(
                r.rid,
                path=dest,
                parent=parent_of(dest),
                name=dest.rsplit(b"/", 1)[-1],
                ctime_ns=now,
                **self._local_change(base.merge(r.version)),
            )
        for r in reversed(movers):  # children's tombstones before their directory's
            self._upsert(
                r.path, None, kind=r.kind.value, mode=r.mode, uid=r.uid, gid=r.gid,
                mtime_ns=now, ctime_ns=now, deleted=1, **self._local_change(r.version),
            )  # fmt: skip
        self.touch_dir(parent_of(old_prefix), now)
        self.touch_dir(parent_of(new_path), now)

    def save_peer(self, node_id: str, address: str, last_seen: float | None) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO peers(node_id, address, last_seen) VALUES (?,?,?)",
            (node_id, address, last_seen),
        )

    def add_holder(self, chunk_id: bytes, node_id: str, done: bool) -> None:
        """A peer acknowledged a push; ``done``: the chunk has all the replicas it needs."""
        self.conn.execute(
            "INSERT OR IGNORE INTO holders(chunk_id, node_id) VALUES (?,?)", (chunk_id, node_id)
        )
        if done:
            self.conn.execute("DELETE FROM push_queue WHERE chunk_id=?", (chunk_id,))

    def add_chunk(self, chunk_id: bytes, size: int, pinned: bool) -> None:
        """A chunk arrived from a peer: a replica (pinned) or a read-through copy (cache)."""
        self.conn.execute(
            "INSERT INTO chunks(chunk_id, size, pinned, last_used) VALUES (?,?,?,?)"
            " ON CONFLICT(chunk_id) DO UPDATE SET pinned=MAX(pinned, excluded.pinned),"
            " last_used=excluded.last_used",
            (chunk_id, size, int(pinned), time.time()),
        )

    def unqueue(self, chunk_id: bytes) -> None:
        self.conn.execute("DELETE FROM push_queue WHERE chunk_id=?", (chunk_id,))

    def queue_push(self, chunk_id: bytes, size: int) -> None:
        """A chunk of a file still being written: peers may have it before its record."""
        self.conn.execute(
            "INSERT OR IGNORE INTO push_queue(chunk_id, size, added) VALUES (?,?,?)",
            (chunk_id, size, time.time()),
        )

    def requeue_underreplicated(self, want: int) -> int:
        """Repair: queue chunks written here that fewer than ``want`` peers acknowledged."""
        return self.conn.execute(
            "INSERT OR IGNORE INTO push_queue(chunk_id, size, added)"
            " SELECT c.chunk_id, c.size, ? FROM chunks c WHERE c.pinned=2 AND"
            " (SELECT COUNT(*) FROM holders h WHERE h.chunk_id=c.chunk_id) < ?",
            (time.time(), want),
        ).rowcount

    def set_peer_sequence(self, node_id: str, index_id: int, sequence: int) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO peer_index(node_id, index_id, sequence) VALUES (?,?,?)",
            (node_id, index_id, sequence),
        )

    def apply_remote(self, rec: Record) -> None:
        """Merge a record from a peer into this node (DESIGN.md §3 merge rules).

        Changes are sequenced here so they are announced on to other peers;
        ``self.invalidations`` collects (parent path, name, old inode) for the
        kernel caches. An inode whose content is replaced or deleted is detached
        (kept on a hidden copy), never dropped: the kernel may hold it, and may
        even be handing it out right now from a lookup racing this transaction;
        ``Filesystem.sweep_detached`` frees the ones it does not hold.
        """
        before = self.last_sequence
        # chunks of a replaced version retire only now: a conflict copy may use them
        self.retire(self._merge(rec))
        if self.last_sequence == before:
            return  # nothing was stored: the peer's version was not news here
        now = self.by_path(rec.path)
        if (
            now is not None
            and now.sequence > (before or 0)
            and now.version == rec.version
            and now.modified_by == rec.modified_by
        ):
            self.received.append(now.sequence)

    def _merge(self, rec: Record) -> set[bytes]:
        """Apply ``rec`` (and the conflict copy it makes, if any); returns the chunks
        of the versions this replaced."""
        row = self.by_path(rec.path)
        local = self.record(row) if row is not None else None
        res = resolve(local, rec)
        replaced = self._store(row, res.winner) if res.changed else set()
        if res.conflict is not None:
            replaced |= self._merge(res.conflict)
        return replaced

    def offer_displaced(self, hidden_rid: int, rec: Record) -> None:
        """A detached inode written here is offered to its old path as a concurrent edit.

        Its hidden row then takes the version the next offer must build on: the
        path's merged version if this content won (later saves dominate it), else
        the offered one (a later save is concurrent again, so nothing is lost).
        """
        self.apply_remote(rec)
        now = self.by_path(rec.path)
        won = now is not None and not now.deleted and self.all_blocks(now.bl) == _trim(rec.blocks)
        base = now.version if won and now is not None else rec.version
        self._set(hidden_rid, version=_vv(base))

    def _store(self, row: Row | None, rec: Record) -> set[bytes]:
        """Write the winning record; returns chunk ids of a block list it dropped."""
        now = now_ns()
        replaced: set[bytes] = set()
        if not rec.deleted and not self._ensure_parents(rec, now):
            return replaced
        revive = rec.deleted and rec.kind == Kind.DIR and row is not None and not row.deleted
        if revive and self.has_children(rec.path):  # deleted here while a child was added
            self._set(
                row.rid,  # type: ignore[union-attr]
                version=_vv(row.version.merge(rec.version).bump(self.node_id)),  # type: ignore[union-attr]
                modified_by=self.node_id,
                sequence=self.next_sequence(),
            )
            return replaced
        old_ino = self.ino_of(row.rid) if row is not None else None
        same_content = (
            row is not None
            and not row.deleted
            and not rec.deleted
            and row.kind == rec.kind
            and row.target == rec.target
            and (rec.kind != Kind.FILE or self.all_blocks(row.bl) == _trim(rec.blocks))
        )
        if row is not None and not row.deleted and not same_content:
            if rec.deleted:
                self._to_trash(row, now, rec.modified_by)
            if old_ino is not None:
                self.detach(row, old_ino)
            else:
                self.conn.execute("DELETE FROM inodes WHERE rid=?", (row.rid,))
            if not rec.deleted and row.bl is not None:
                bl, row = row.bl, dataclasses.replace(row, bl=None)
                self._set(row.rid, bl=None)
                replaced = self.drop_blocklist_if_unused(bl)
        bl = row.bl if row is not None and same_content else None
        if rec.kind == Kind.FILE and not rec.deleted and not same_content:
            bl = self.new_blocklist()
            self.conn.executemany(
                "INSERT INTO blocks(bl, idx, chunk_id, h, length) VALUES (?,?,?,?,?)",
                [
                    (bl, i, b.chunk_id, b.h, b.length)
                    for i, b in enumerate(rec.blocks)
                    if b.chunk_id is not None
                ],
            )
        rid = self._upsert(
            rec.path, row,
            kind=rec.kind.value, mode=rec.mode, uid=rec.uid, gid=rec.gid, size=rec.size,
            mtime_ns=rec.mtime_ns, ctime_ns=now, target=rec.target, version=_vv(rec.version),
            modified_by=rec.modified_by, deleted=int(rec.deleted), sequence=self.next_sequence(),
            bl=bl,
        )  # fmt: skip
        if not rec.deleted and self.ino_of(rid) is None:  # type: ignore[arg-type]
            self.new_inode(rid)  # type: ignore[arg-type]
        self.touch_dir(parent_of(rec.path), now)
        self.invalidations.append((parent_of(rec.path), rec.name, old_ino, same_content))
        return replaced

    def _ensure_parents(self, rec: Record, now: int) -> bool:
        """A live record needs live directories above it: revive or create them."""
        parts = rec.path.split(b"/")[:-1]
        for depth in range(1, len(parts) + 1):
            path = b"/".join(parts[:depth])
            row = self.by_path(path)
            if row is not None and not row.deleted:
                if row.kind != Kind.DIR:
                    log.warning("record %r lies under a non-directory; not applied", rec.path)
                    return False
                continue
            rid = self._upsert(
                path, row,
                kind="dir", mode=0o755, uid=rec.uid, gid=rec.gid, size=0, mtime_ns=now,
                ctime_ns=now, target=b"", deleted=0, bl=None,
                **self._local_change(row.version if row is not None else VersionVector()),
            )  # fmt: skip
            self.new_inode(rid)  # type: ignore[arg-type]
            self.invalidations.append((parent_of(path), parts[depth - 1], None, False))
        return True

    def forget_hidden(self, ino: int) -> list[bytes]:
        """The kernel forgot a detached inode: drop it; returns chunks to delete now."""
        row = self.by_ino(ino)
        self.conn.execute("DELETE FROM inodes WHERE ino=?", (ino,))
        if row is None or not row.hidden:
            return []
        self.conn.execute("DELETE FROM records WHERE rid=?", (row.rid,))
        return self.supersede(self.drop_blocklist_if_unused(row.bl))

    def drop_blocklist_if_unused(self, bl: int | None) -> set[bytes]:
        """Delete block list ``bl`` unless a record or the trash uses it; returns its
        chunk ids (the caller decides whether they are deleted or retired)."""
        if bl is None:
            return set()
        used = self.conn.execute(
            "SELECT 1 FROM records WHERE bl=? UNION ALL SELECT 1 FROM trash WHERE bl=? LIMIT 1",
            (bl, bl),
        ).fetchone()
        if used:
            return set()
        ids = {
            bytes(c)
            for (c,) in self.conn.execute(
                "SELECT chunk_id FROM blocks WHERE bl=? AND chunk_id IS NOT NULL", (bl,)
            )
        }
        self.conn.execute("DELETE FROM blocks WHERE bl=?", (bl,))
        return ids

    def expire_trash(self, before: float) -> list[bytes]:
        """Drop trash entries deleted before ``before``; returns chunks now unreferenced."""
        gone: list[bytes] = []
        for tid, bl in self.conn.execute(
            "SELECT tid, bl FROM trash WHERE deleted_at<?", (before,)
        ).fetchall():
            self.conn.execute("DELETE FROM trash WHERE tid=?", (tid,))
            gone += self.drop_unreferenced(self.drop_blocklist_if_unused(bl))
        return gone

    def reclaim(
        self, grace_before: float, cache_limit: int, keep: frozenset[bytes] = frozenset()
    ) -> list[bytes]:
        """Chunks to delete: unreferenced past the grace period, then cached ones LRU
        while the cache is over its limit. Referenced = in any block list (live
        records, the trash, detached inodes still open)."""
        unreferenced = [
            bytes(c)
            for (c,) in self.conn.execute(
                "SELECT chunk_id FROM chunks WHERE last_used<? AND NOT EXISTS"
                " (SELECT 1 FROM blocks WHERE blocks.chunk_id=chunks.chunk_id)",
                (grace_before,),
            )
        ]
        gone = self.drop_unreferenced(c for c in unreferenced if c not in keep)
        _, cached = self.chunk_bytes()
        evict: list[bytes] = []
        if cached > cache_limit:
            for c, size in self.conn.execute(
                "SELECT chunk_id, size FROM chunks WHERE pinned=0 ORDER BY last_used"
            ).fetchall():
                if cached <= cache_limit:
                    break
                if bytes(c) in keep:  # a write being staged has the same content
                    continue
                evict.append(bytes(c))
                cached -= size
            self.conn.executemany("DELETE FROM chunks WHERE chunk_id=?", [(c,) for c in evict])
        return gone + evict

    def drop_hidden(self) -> list[bytes]:
        """At start-up no inode is open: remove every detached copy."""
        gone: list[bytes] = []
        for rid, bl in self.conn.execute("SELECT rid, bl FROM records WHERE hidden=1").fetchall():
            self.conn.execute("DELETE FROM inodes WHERE rid=?", (rid,))
            self.conn.execute("DELETE FROM records WHERE rid=?", (rid,))
            gone += self.supersede(self.drop_blocklist_if_unused(bl))
        return gone

    # --- trash restore and fsck repairs (swarmfs/trash.py, swarmfs/fsck.py) ---

    def restore_trash(self, tid: int, now: int) -> int:
        """Bring trash entry ``tid`` back as a live file at its path; returns the rid.

        A local change like any write: the version is bumped over the tombstone
        (so it replicates to every node and beats the delete), missing parent
        directories are created, the kernel caches are invalidated through
        ``self.invalidations``, and the entry leaves this node's trash. The
        caller checks first that the path is free and its parents are not files.
        """
        path, mode, size, mtime_ns, bl = self.conn.execute(
            "SELECT path, mode, size, mtime_ns, bl FROM trash WHERE tid=?", (tid,)
        ).fetchone()
        path = bytes(path)
        old = self.by_path(path)
        assert old is None or old.deleted, "restore over a live record"
        uid, gid = (old.uid, old.gid) if old is not None else (os.getuid(), os.getgid())
        base = old.version if old is not None else VersionVector()
        parents = Record(path, Kind.FILE, mode, uid, gid, size, mtime_ns, base, self.node_id)
        if not self._ensure_parents(parents, now):
            raise ValueError(f"{path!r} lies under a non-directory")
        rid = self._upsert(
            path, old,
            kind=Kind.FILE.value, mode=mode, uid=uid, gid=gid, size=size, mtime_ns=mtime_ns,
            ctime_ns=now, atime_ns=now, target=b"", deleted=0, bl=bl, hidden=0,
            **self._local_change(base),
        )  # fmt: skip
        self.conn.execute("DELETE FROM trash WHERE tid=?", (tid,))
        self.new_inode(rid)
        self.touch_dir(parent_of(path), now)
        self.invalidations.append((parent_of(path), path.rsplit(b"/", 1)[-1], None, False))
        return rid

    def fix_inventory(self, drop: Iterable[bytes], put: Iterable[tuple[bytes, int]]) -> None:
        """fsck --repair: forget chunks no longer on disk (nor to be pushed from here), and
        record ``(id, size)`` of chunks on disk, pinned (they may be the only copy)."""
        gone = [(c,) for c in drop]
        for table in ("chunks", "push_queue"):
            self.conn.executemany(f"DELETE FROM {table} WHERE chunk_id=?", gone)
        self.conn.executemany(
            "INSERT INTO chunks(chunk_id, size, pinned, last_used) VALUES (?,?,1,?)"
            " ON CONFLICT(chunk_id) DO UPDATE SET size=excluded.size",
            [(c, n, time.time()) for c, n in put],
        )


class Database:
    """Owns the connections; ``reader`` for queries, ``write(fn)`` for transactions."""

    def __init__(self, path: Path, node_id: str) -> None:
        self.path = path
        self.node_id = node_id
        self.push_new_chunks = True
        self._writer = _connect(path)
        self._writer.execute("PRAGMA wal_autocheckpoint=0")  # see write(): not inside a commit
        self._writes = 0
        self._checkpointing = False
        self._closed = False
        self._writer.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(1)
        self.reader = Queries(_connect(path))
        self._changed = trio.Event()
        self._sequence = self.reader.sequence()
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
            return self._transaction(fn)

    def _transaction(self, fn: Callable[[Txn], T]) -> T:
        txn = Txn(self._writer, self.node_id, self.push_new_chunks)
        self._writer.execute("BEGIN IMMEDIATE")
        try:
            result = fn(txn)
            self._writer.execute("COMMIT")  # may fail too (a full disk): then roll back
        except BaseException:
            if self._writer.in_transaction:
                self._writer.execute("ROLLBACK")
            for undo in txn.on_rollback:  # still under the lock: before any other commit
                undo()
            raise
        if txn.last_sequence is not None:
            self._sequence = txn.last_sequence
        return result

    @property
    def sequence(self) -> int:
        """The newest committed change's sequence, without a query (every write wakes
        the announcer, which checks this)."""
        return self._sequence

    async def write(self, fn: Callable[[Txn], T], *, small: bool = False) -> T:
        """Run ``fn`` in one transaction, in the writer thread unless ``small``.

        ``small``: a transaction of a few rows (create, unlink, setattr) runs on the
        loop itself when no other write is under way, because the two thread
        switches cost several times the transaction (~60 µs against ~10 µs), and
        a ``touch`` makes two of them. Commits never wait for the disk
        (``synchronous=NORMAL``), and checkpoints, which do, run in a worker
        thread every ``CHECKPOINT_EVERY`` writes rather than inside a commit.
        """
        try:
            if small and self._limiter.borrowed_tokens == 0 and self._lock.acquire(blocking=False):
                try:
                    result = self._transaction(fn)
                finally:
                    self._lock.release()
            else:
                result = await trio.to_thread.run_sync(self.write_sync, fn, limiter=self._limiter)
        finally:
            changed, self._changed = self._changed, trio.Event()
            changed.set()
        self._writes += 1
        if self._writes >= CHECKPOINT_EVERY and not self._checkpointing:
            self._writes, self._checkpointing = 0, True
            # behind the caller: a checkpoint waits for the disk (~2 ms), a write need not
            trio.lowlevel.spawn_system_task(self._checkpoint)
        await trio.lowlevel.cancel_shielded_checkpoint()  # an inline commit did not yield
        return result

    async def _checkpoint(self) -> None:
        """Copy the WAL into the database file, so the WAL stops growing. A system task:
        raises nothing but Cancelled (the run is ending; closing checkpoints anyway)."""
        try:
            await trio.to_thread.run_sync(self._checkpoint_sync, limiter=self._limiter)
        except sqlite3.Error as exc:  # the WAL keeps every commit until the next one
            log.warning("checkpointing the metadata WAL failed: %s", exc)
        finally:
            self._checkpointing = False

    def _checkpoint_sync(self) -> None:
        with self._lock:
            if not self._closed:
                self._writer.execute("PRAGMA wal_checkpoint(PASSIVE)")

    async def wait_write(self) -> None:
        """Return after the next write transaction (committed or not)."""
        await self._changed.wait()

    async def wait_changed(self, seen_sequence: int) -> None:
        """Return once a change after ``seen_sequence`` is committed."""
        while self._sequence <= seen_sequence:
            await self._changed.wait()

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
        with self._lock:  # a checkpoint may be running in a worker thread
            self._closed = True
            self.reader.conn.close()
            self._writer.close()


def _trim(blocks: tuple[Block, ...]) -> tuple[Block, ...]:
    """A block list without trailing holes (stored lists never end in one)."""
    end = len(blocks)
    while end and blocks[end - 1] == HOLE:
        end -= 1
    return blocks[:end]
