"""``swarmfs fsck``: verify every stored chunk and every record of one node.

Chunks: each file under ``chunks/`` must be named by the SHA-256 of its
content at the right ``ab/cd/`` place; a chunk some block list references must
also pass its AEAD tag and plaintext hash (``crypto.chunks.verify``); the
inventory (``chunks`` table) must list exactly the chunks on disk, with their
sizes. Records: paths well formed, live records under live directories, block
lists consistent (``Queries.check_records``/``check_blocks``).

``--repair`` deletes corrupt chunk files (a later read fetches a good copy
from a peer, the way a read that fails its tag does), deletes stray files and
unreferenced chunks nothing accounts for, and fixes inventory rows. Damage to
records is reported, not repaired: the fix depends on which side is right,
and a peer's copy of the record usually repairs it through sync.

``check`` is synchronous and blocking (it reads every chunk): the CLI runs it
offline holding the data dir's lock; a running node runs it in a worker thread
(control command ``fsck``), reading through its own connection and repairing
through ``Database.write_sync``. Online, a chunk the node is committing may
be on disk before its inventory row: findings about the inventory are checked
again after the scan, and an unaccounted chunk younger than ``ONLINE_GRACE``
is left alone.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarmfs import CHUNK_SIZE
from swarmfs.crypto.chunks import id_matches, verify
from swarmfs.crypto.keys import derive_key
from swarmfs.datadir import DataDir
from swarmfs.errors import CorruptChunk, UserError
from swarmfs.meta.db import HIDDEN_PARENT, Database, Queries, _connect
from swarmfs.meta.records import Kind, parent_of
from swarmfs.store.cas import ChunkStore
from swarmfs.trash import display_path

ONLINE_GRACE = 600.0
"""Seconds a running node's unaccounted chunk may be a commit in progress."""
MAX_REPORTED = 1000
"""Problem lines sent over the control socket; the count says how many more."""

_HEX = frozenset("0123456789abcdef")
_KINDS = frozenset(k.value for k in Kind)


@dataclass
class Report:
    """What one run found (and, with repair, did): one line per problem."""

    chunks: int = 0
    records: int = 0
    problems: list[str] = field(default_factory=list)
    repaired: int = 0
    omitted: int = 0

    def as_json(self) -> dict[str, Any]:
        shown = self.problems[:MAX_REPORTED]
        omitted = self.omitted + len(self.problems) - len(shown)
        return {
            "chunks": self.chunks,
            "records": self.records,
            "problems": shown,
            "repaired": self.repaired,
            "omitted": omitted,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    @property
    def damaged(self) -> bool:
        return bool(self.problems or self.omitted)

    def summary(self, repair: bool) -> str:
        checked = f"checked {_count(self.chunks, 'chunk')} and {_count(self.records, 'record')}"
        if not self.damaged:
            return f"{checked}: no damage found"
        found = len(self.problems) + self.omitted
        fixed = f", {self.repaired} repaired" if repair else " (run with --repair to fix chunks)"
        return f"{checked}: {_count(found, 'problem')} found{fixed}"


class _Checker:
    def __init__(
        self, db: Database, store: ChunkStore, content_key: bytes, repair: bool, online: bool
    ) -> None:
        self.db = db
        self.store = store
        self.key = content_key
        self.repair = repair
        self.grace = ONLINE_GRACE if online else 0.0
        self.report = Report()
        self.q = Queries(_connect(db.path))
        self.on_disk: set[bytes] = set()
        self.drop: set[bytes] = set()  # inventory rows to delete
        self.put: dict[bytes, int] = {}  # inventory rows to add or correct

    def problem(self, text: str, fix: str | None = None) -> None:
        """Record one problem; ``fix`` says what repair did about it."""
        if fix is not None and self.repair:
            self.report.repaired += 1
            text = f"{text} ({fix})"
        self.report.problems.append(text)

    def run(self) -> Report:
        try:
            self.check_records()
            self.check_chunks()
        finally:
            self.q.conn.close()
        return self.report

    # --- chunks ---

    def check_chunks(self) -> None:
        inventory = self.q.check_inventory()
        for path in self._chunk_files():
            self.check_chunk(path, inventory)
        # Online, the node may have changed the inventory during the scan: judge it afresh.
        fresh = self.q.check_inventory() if self.grace else inventory
        for chunk_id in sorted(inventory.keys() - self.on_disk):
            if chunk_id in fresh and not self.store.has(chunk_id):
                self.problem(f"chunk {chunk_id.hex()}: in the inventory but not on disk", "forgot")
                self.drop.add(chunk_id)
        if self.repair and (self.drop or self.put):
            drop, put = sorted(self.drop), sorted(self.put.items())
            self.db.write_sync(lambda t: t.fix_inventory(drop, put))

    def _chunk_files(self) -> list[Path]:
        """Every chunk file; anything else in the chunk tree is reported as stray."""
        found: list[Path] = []
        root = self.store.root
        if not root.is_dir():
            return found
        for top in sorted(root.iterdir()):
            if top.name == "tmp":
                continue  # half-written puts; cleaned at node start
            for sub in sorted(top.iterdir()) if _is_dir(top) else [top]:
                for path in sorted(sub.iterdir()) if _is_dir(sub) else [sub]:
                    name = path.name
                    placed = (top.name, sub.name) == (name[:2], name[2:4])
                    if len(name) == 64 and set(name) <= _HEX and placed and _is_file(path):
                        found.append(path)
                    else:
                        self._stray(path)
        return found

    def _stray(self, path: Path) -> None:
        fix = None
        if self.repair and _is_file(path):
            path.unlink(missing_ok=True)
            fix = "deleted"
        self.problem(f"stray file in the chunk store: {path}", fix)

    def check_chunk(self, path: Path, inventory: dict[bytes, int]) -> None:
        chunk_id = bytes.fromhex(path.name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return  # deleted by the node meanwhile (online)
        except OSError as exc:
            self.problem(f"chunk {chunk_id.hex()}: unreadable ({exc.strerror})")
            return
        self.report.chunks += 1
        self.on_disk.add(chunk_id)
        hashes = self.q.chunk_hashes(chunk_id)
        try:
            if not id_matches(chunk_id, data):
                raise CorruptChunk("content does not match its id")
            for h in sorted(h for h in hashes if h is not None):
                verify(self.key, chunk_id, h, data)
        except CorruptChunk as exc:
            reason = str(exc).split(": ", 1)[-1]
            self._delete(chunk_id, f"chunk {chunk_id.hex()}: {reason}")
            return
        if len(hashes) > 1:
            self.problem(f"chunk {chunk_id.hex()}: block lists disagree on its plaintext hash")
        size = len(data)
        if chunk_id not in inventory:
            if self._accounted_for(chunk_id, path):
                return
            if hashes:
                self.problem(f"chunk {chunk_id.hex()}: stored but not in the inventory", "added")
                self.put[chunk_id] = size
            else:
                self._delete(chunk_id, f"chunk {chunk_id.hex()}: referenced by nothing")
        elif inventory[chunk_id] != size:
            self.problem(
                f"chunk {chunk_id.hex()}: the inventory says {inventory[chunk_id]} bytes,"
                f" the file has {size}",
                "corrected",
            )
            self.put[chunk_id] = size

    def _accounted_for(self, chunk_id: bytes, path: Path) -> bool:
        """Online: the node may be committing this chunk right now."""
        if not self.grace:
            return False
        if chunk_id in self.q.check_inventory():
            return True
        try:
            return time.time() - path.stat().st_mtime < self.grace
        except FileNotFoundError:
            return True

    def _delete(self, chunk_id: bytes, text: str) -> None:
        if self.repair:
            self.store.delete(chunk_id)
            self.drop.add(chunk_id)
        self.problem(text, "deleted; a read fetches it from a peer")

    # --- records ---

    def check_records(self) -> None:
        rows = self.q.check_records()
        live_kinds = {
            bytes(path): kind for _r, path, _p, _n, kind, deleted, _h, _b, _v in rows if not deleted
        }
        for rid, path, parent, name, kind, deleted, hidden, bl, version in rows:
            self.report.records += 1
            path = bytes(path)
            for problem in _record_problems(
                path,
                None if parent is None else bytes(parent),
                bytes(name),
                kind,
                bool(deleted),
                bool(hidden),
                bl,
                version,
                live_kinds,
            ):
                self.problem(f"record {display_path(path)!r} (rid {rid}): {problem}")
        for what, subject in self.q.check_blocks(CHUNK_SIZE):
            self.problem(f"{what}: {_subject(subject)}")


def _record_problems(
    path: bytes,
    parent: bytes | None,
    name: bytes,
    kind: str,
    deleted: bool,
    hidden: bool,
    bl: int | None,
    version: str,
    live_kinds: dict[bytes, str],
) -> list[str]:
    problems: list[str] = []
    if kind not in _KINDS:
        problems.append(f"unknown kind {kind!r}")
    if not _valid_version(version):
        problems.append("malformed version vector")
    if path == b"":
        if parent is not None or kind != Kind.DIR or deleted:
            problems.append("the root is not a live directory")
        return problems
    if hidden:
        if parent != HIDDEN_PARENT or not path.startswith(HIDDEN_PARENT + b"/"):
            problems.append("a detached copy outside the hidden area")
        return problems
    parts = path.split(b"/")
    if any(p in (b"", b".", b"..") or b"\x00" in p for p in parts):
        problems.append("malformed path")
    elif not all(_utf8(p) for p in parts):
        problems.append("a name that is not UTF-8")
    if parent != parent_of(path) or name != parts[-1]:
        problems.append("parent or name columns disagree with the path")
    if deleted:
        if bl is not None:
            problems.append("a tombstone with a block list")
        return problems
    if live_kinds.get(parent_of(path)) != Kind.DIR:
        problems.append(f"its parent {display_path(parent_of(path))!r} is not a live directory")
    if (kind == Kind.FILE) != (bl is not None):
        problems.append(
            "a file without a block list" if kind == Kind.FILE else f"a {kind} with a block list"
        )
    return problems


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _valid_version(text: str) -> bool:
    try:
        vector = json.loads(text)
    except (TypeError, ValueError):
        return False
    return isinstance(vector, dict) and all(
        isinstance(k, str) and type(v) is int and v > 0 for k, v in vector.items()
    )


def _utf8(name: bytes) -> bool:
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _subject(subject: object) -> str:
    if isinstance(subject, tuple):
        return ", ".join(repr(display_path(s)) if isinstance(s, bytes) else str(s) for s in subject)
    return str(subject)


def _is_dir(path: Path) -> bool:
    return stat.S_ISDIR(os.lstat(path).st_mode)


def _is_file(path: Path) -> bool:
    return stat.S_ISREG(os.lstat(path).st_mode)


def check(
    db: Database, store: ChunkStore, content_key: bytes, repair: bool, *, online: bool
) -> Report:
    """Verify (and with ``repair`` fix) one node's chunks and records; blocks for a while."""
    return _Checker(db, store, content_key, repair, online).run()


def check_offline(data_dir: DataDir, repair: bool) -> Report:
    """``check`` on a data dir no node runs on; holds its lock so none starts meanwhile."""
    if not data_dir.path.is_dir():
        raise UserError(f"no data dir at {data_dir.path}")
    with data_dir.acquire_lock():
        key = derive_key(data_dir.swarm_key(), "content")
        db = Database(data_dir.db_file, data_dir.identity().node_id)
        try:
            return check(db, ChunkStore(data_dir.chunks_dir), key, repair, online=False)
        finally:
            db.close()
