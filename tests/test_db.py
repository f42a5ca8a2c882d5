"""The record/inode model of ``meta/db.py`` (DESIGN.md §3), without a filesystem on top."""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from faultkit import fill_disk, small_disk

from swarmfs.meta.db import CHECKPOINT_EVERY, ROOT_INO, Database, Txn, now_ns
from swarmfs.meta.records import Block, Kind, Order, Record, VersionVector

NODE = "aaaaaaaaaaaaaaaaaaaaaaaaaa"


@pytest.fixture
def db(tmp_path: Path):
    database = Database(tmp_path / "swarmfs.db", NODE)
    yield database
    database.close()


def _create(db: Database, path: bytes, kind: Kind = Kind.FILE, target: bytes = b"") -> int:
    rid, _ino = db.write_sync(lambda t: t.create(path, kind, 0o644, 0, 0, now_ns(), target))
    return rid


def _ino(db: Database, path: bytes) -> int:
    row = db.reader.by_path(path)
    assert row is not None
    ino = db.reader.ino_of(row.rid)
    assert ino is not None
    return ino


def test_root_is_inode_one_and_survives_reopening(tmp_path: Path) -> None:
    first = Database(tmp_path / "swarmfs.db", NODE)
    root = first.reader.by_ino(ROOT_INO)
    index_id = first.reader.meta("index_id")
    first.close()
    again = Database(tmp_path / "swarmfs.db", NODE)
    try:
        assert root is not None and root.path == b"" and root.kind == Kind.DIR
        assert again.reader.by_ino(ROOT_INO) == root
        assert again.reader.meta("index_id") == index_id
    finally:
        again.close()


def test_inode_numbers_are_never_reused_after_delete(db: Database) -> None:
    seen: list[int] = []
    for round_ in range(5):
        for name in (b"a", b"b"):
            _create(db, name)
            seen.append(_ino(db, name))
        for name in (b"a", b"b"):
            row = db.reader.by_path(name)
            assert row is not None
            db.write_sync(lambda t, row=row: t.delete(row, now_ns(), None))
            assert db.reader.by_path(name).deleted  # type: ignore[union-attr]
            assert db.reader.ino_of(row.rid) is None, f"round {round_}: inode not dropped"
    assert len(set(seen)) == len(seen), f"an inode number was reused: {seen}"
    assert seen == sorted(seen)
    assert min(seen) > ROOT_INO


def test_recreating_a_deleted_path_revives_its_record_with_a_newer_version(db: Database) -> None:
    rid = _create(db, b"f")
    first = db.reader.by_rid(rid)
    assert first is not None
    db.write_sync(lambda t: t.delete(first, now_ns(), None))
    tomb = db.reader.by_path(b"f")
    assert tomb is not None
    rid2 = _create(db, b"f")
    revived = db.reader.by_rid(rid2)
    assert revived is not None and not revived.deleted
    assert revived.version.compare(tomb.version) == Order.AFTER
    assert revived.version.compare(first.version) == Order.AFTER


def test_rename_keeps_rid_and_inode_and_leaves_a_tombstone(db: Database) -> None:
    rid = _create(db, b"old")
    ino = _ino(db, b"old")
    before = db.reader.by_rid(rid)
    assert before is not None
    db.write_sync(lambda t: t.move(before, b"new", now_ns()))
    moved = db.reader.by_path(b"new")
    assert moved is not None and moved.rid == rid and not moved.deleted
    assert db.reader.ino_of(rid) == ino
    assert db.reader.by_ino(ino) == moved
    assert moved.version.compare(before.version) == Order.AFTER
    tomb = db.reader.by_path(b"old")
    assert tomb is not None and tomb.deleted and tomb.rid != rid
    assert tomb.version.compare(before.version) == Order.AFTER
    assert moved.sequence > before.sequence and tomb.sequence > before.sequence


def test_directory_rename_keeps_every_descendants_inode(db: Database) -> None:
    _create(db, b"d", Kind.DIR)
    _create(db, b"d/sub", Kind.DIR)
    _create(db, b"d/sub/f")
    _create(db, b"d/g")
    _create(db, b"d0")  # sorts between b"d/" and b"d0"-prefixed paths: must not move
    inos = {p: _ino(db, p) for p in (b"d", b"d/sub", b"d/sub/f", b"d/g", b"d0")}
    d = db.reader.by_path(b"d")
    assert d is not None
    db.write_sync(lambda t: t.move(d, b"e", now_ns()))
    for old, ino in inos.items():
        new = b"e" + old[1:] if old != b"d0" else old
        row = db.reader.by_ino(ino)
        assert row is not None and row.path == new and not row.deleted, (old, row)
    for old in (b"d", b"d/sub", b"d/sub/f", b"d/g"):
        assert db.reader.by_path(old).deleted  # type: ignore[union-attr]
    assert [r.name for r, _ in db.reader.entries(b"e", 0, 10)] == [b"sub", b"g"]
    assert db.reader.entries(b"d", 0, 10) == []


def test_tombstones_are_kept_with_bumped_version_vectors(db: Database) -> None:
    rid = _create(db, b"f")
    row = db.reader.by_rid(rid)
    assert row is not None
    assert row.version == VersionVector.of({NODE: 1})
    db.write_sync(lambda t: t.delete(row, now_ns(), None))
    tomb = db.reader.by_path(b"f")
    assert tomb is not None and tomb.deleted and tomb.rid == rid
    assert tomb.version == VersionVector.of({NODE: 2})
    assert tomb.sequence > row.sequence
    assert tomb.modified_by == NODE
    assert db.reader.entries(b"", 0, 10) == []  # not listed
    assert not db.reader.has_children(b"")
    # still there after many more changes: nothing garbage-collects tombstones
    for i in range(20):
        _create(db, b"other%d" % i)
    assert db.reader.by_path(b"f") == tomb


def test_delete_moves_the_block_list_to_the_trash(db: Database) -> None:
    rid = _create(db, b"f")
    block = Block(b"\x01" * 32, b"\x02" * 32, 10)
    db.write_sync(
        lambda t: t.commit_content(
            rid, 10, now_ns(), now_ns(), {0: block}, 0, 1, [(b"\x01" * 32, 27)]
        )
    )
    row = db.reader.by_rid(rid)
    assert row is not None and row.bl is not None
    db.write_sync(lambda t: t.delete(row, now_ns(), None))
    trash = db.reader.trash()
    assert [(bytes(t[1]), t[2], t[3]) for t in trash] == [(b"f", "file", 10)]
    assert db.reader.chunk_referenced(b"\x01" * 32)  # kept for restore


def test_block_list_with_holes(db: Database) -> None:
    rid = _create(db, b"sparse")
    mib = 1024 * 1024
    b0 = Block(b"\x10" * 32, b"\x11" * 32, mib)
    b3 = Block(b"\x30" * 32, b"\x31" * 32, 5)
    hole = Block(None, None, 0)
    changed = {0: b0, 2: hole, 3: b3}

    def commit(t: Txn) -> list[bytes]:
        return t.commit_content(
            rid,
            3 * mib + 5,
            now_ns(),
            now_ns(),
            changed,
            0,
            4,
            [(b"\x10" * 32, 1), (b"\x30" * 32, 1)],
        )

    assert db.write_sync(commit) == []
    row = db.reader.by_rid(rid)
    assert row is not None and row.size == 3 * mib + 5
    blocks = db.reader.blocks(row.bl, 0, 3)
    assert blocks == {0: b0, 2: hole, 3: b3}  # index 1: absent, also a hole
    assert db.reader.blocks(row.bl, 1, 1) == {}
    # truncating to one chunk drops the rest and reports the chunks no longer used
    gone = db.write_sync(lambda t: t.commit_content(rid, 100, now_ns(), now_ns(), {}, 1, 1, []))
    assert gone == [b"\x30" * 32]
    row = db.reader.by_rid(rid)
    assert row is not None
    assert db.reader.blocks(row.bl, 0, 10) == {0: b0}
    assert not db.reader.chunk_referenced(b"\x30" * 32)


def test_a_replaced_version_retires_to_the_cache_once_a_peer_is_known(db: Database) -> None:
    """A peer may be reading the version it was told about: its chunks stay (as
    cache) until GC's grace period is over; alone, a node deletes them at once."""
    rid = _create(db, b"f")
    old, new = Block(b"\x10" * 32, b"\x11" * 32, 5), Block(b"\x20" * 32, b"\x21" * 32, 5)

    def commit(block: Block) -> list[bytes]:
        return db.write_sync(
            lambda t: t.commit_content(rid, 5, 0, 0, {0: block}, 1, 1, [(block.chunk_id, 9)])
        )

    assert commit(old) == []
    db.write_sync(lambda t: t.save_peer("p" * 26, "127.0.0.1:1", time.time()))
    assert commit(new) == []
    assert db.reader.chunk_bytes() == (9, 9), "one written chunk, one retired to the cache"
    assert db.reader.push_batch(10) == [(new.chunk_id, 9)], "a retired chunk is not pushed"
    assert db.write_sync(lambda t: t.reclaim(time.time() - 60, 1 << 40)) == []
    assert db.write_sync(lambda t: t.reclaim(time.time() + 1, 1 << 40)) == [old.chunk_id]


def test_appending_a_block_touches_one_row(db: Database) -> None:
    rid = _create(db, b"log")
    mib = 1024 * 1024
    blocks = {i: Block(bytes([i]) * 32, bytes([i]) * 32, mib) for i in range(50)}
    db.write_sync(lambda t: t.commit_content(rid, 50 * mib, 0, 0, blocks, 0, 50, []))
    statements: list[str] = []
    db._writer.set_trace_callback(statements.append)
    try:
        extra = Block(b"\xff" * 32, b"\xfe" * 32, 1)
        db.write_sync(lambda t: t.commit_content(rid, 50 * mib + 1, 0, 0, {50: extra}, 50, 51, []))
    finally:
        db._writer.set_trace_callback(None)
    inserts = [
        s for s in statements if s.lstrip().upper().startswith("INSERT OR REPLACE INTO BLOCKS")
    ]
    assert len(inserts) == 1, statements
    row = db.reader.by_rid(rid)
    assert row is not None
    assert len(db.reader.blocks(row.bl, 0, 100)) == 51


def test_every_change_gets_the_next_sequence_number(db: Database) -> None:
    seqs = []
    for name in (b"a", b"b", b"c"):
        rid = _create(db, name)
        seqs.append(db.reader.by_rid(rid).sequence)  # type: ignore[union-attr]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert int(db.reader.meta("sequence")) == seqs[-1]  # type: ignore[arg-type]


def test_a_failed_transaction_changes_nothing(db: Database) -> None:
    _create(db, b"keep")

    def bad(t: Txn) -> None:
        t.create(b"ghost", Kind.FILE, 0o644, 0, 0, now_ns())
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        db.write_sync(bad)
    assert db.reader.by_path(b"ghost") is None
    assert [r.name for r, _ in db.reader.entries(b"", 0, 10)] == [b"keep"]


def test_database_is_in_wal_mode(db: Database, tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "swarmfs.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


async def test_small_writes_commit_on_the_loop_and_the_wal_is_checkpointed(
    tmp_path: Path, db: Database
) -> None:
    """Creates run inline (no thread switch) unless a write is already under way, and
    since commits no longer checkpoint by themselves, the periodic checkpoint must
    keep the WAL from growing with every create."""
    loop_thread = threading.get_ident()
    threads: list[int] = []

    def create(t: Txn, path: bytes) -> None:
        threads.append(threading.get_ident())
        t.create(path, Kind.FILE, 0o644, 0, 0, now_ns())

    for i in range(2000):
        await db.write(lambda t, i=i: create(t, b"f%d" % i), small=True)
    # the others met a checkpoint under way, and waited for the writer thread
    assert threads.count(loop_thread) > 1800
    assert db.reader.by_path(b"f1999") is not None
    wal = tmp_path / "swarmfs.db-wal"
    assert wal.stat().st_size < 8 << 20, "2 000 creates without a checkpoint fill ~100 MiB"

    started, release = trio.Event(), threading.Event()

    def slow(t: Txn) -> None:
        trio.from_thread.run_sync(started.set)
        release.wait(10)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(db.write, slow)
        await started.wait()
        threads.clear()
        nursery.start_soon(functools.partial(db.write, small=True), lambda t: create(t, b"x"))
        await trio.testing.wait_all_tasks_blocked()
        assert threads == [], "a small write waits for the write under way"
        release.set()
    assert len(threads) == 1 and loop_thread not in threads


PEER = "pppppppppppppppppppppppppp"


def _commit_block(db: Database, rid: int, block: Block) -> None:
    db.write_sync(lambda t: t.commit_content(rid, 5, 0, 0, {0: block}, 1, 1, [(block.chunk_id, 9)]))


def _pinned(db: Database, chunk_id: bytes) -> int | None:
    row = db.reader.conn.execute("SELECT pinned FROM chunks WHERE chunk_id=?", (chunk_id,))
    found = row.fetchone()
    return None if found is None else found[0]


def test_cache_eviction_spares_chunks_a_write_is_staging(db: Database) -> None:
    """A new write of the same content as a retired chunk finds its file already there;
    evicting it before that write commits lost the data (GC deleted the file)."""
    rid = _create(db, b"f")
    old, new = Block(b"\x10" * 32, b"\x11" * 32, 5), Block(b"\x20" * 32, b"\x21" * 32, 5)
    _commit_block(db, rid, old)
    db.write_sync(lambda t: t.save_peer(PEER, "127.0.0.1:1", time.time()))
    _commit_block(db, rid, new)  # old retires to the cache
    assert _pinned(db, old.chunk_id) == 0
    staged = frozenset({old.chunk_id})
    assert db.write_sync(lambda t: t.reclaim(time.time() - 60, 0, staged)) == []
    assert db.write_sync(lambda t: t.reclaim(time.time() - 60, 0)) == [old.chunk_id]


def test_chunks_a_conflict_copy_takes_over_stay_pinned_and_queued(db: Database) -> None:
    """A replaced local version that became the conflict copy was retired first (its
    chunks unpinned and dropped from the push queue), so the copy could be evicted."""
    rid = _create(db, b"f")
    mine = Block(b"\x10" * 32, b"\x11" * 32, 5)
    _commit_block(db, rid, mine)
    db.write_sync(lambda t: t.save_peer(PEER, "127.0.0.1:1", time.time()))
    db.write_sync(lambda t: t.conn.execute("DELETE FROM inodes WHERE rid=?", (rid,)))
    theirs = Record(
        b"f", Kind.FILE, 0o644, 0, 0, 5, now_ns() + 10**12, VersionVector.of({PEER: 1}), PEER,
        blocks=(Block(b"\x30" * 32, b"\x31" * 32, 5),),
    )  # fmt: skip
    db.write_sync(lambda t: t.apply_remote(theirs))
    names = [r.name for r, _ in db.reader.entries(b"", 0, 10)]
    assert len(names) == 2 and any(b"sync-conflict" in n for n in names)
    assert _pinned(db, mine.chunk_id) == 2
    assert (mine.chunk_id, 9) in db.reader.push_batch(10)


def test_a_failed_commit_leaves_the_connection_ready_for_the_next(tmp_path: Path) -> None:
    """COMMIT itself can fail on a full disk (WAL frames are written then); once space
    is back the next transaction must work (SQLite rolls back on SQLITE_FULL; for other
    errors ``_transaction`` rolls back itself)."""
    with small_disk(tmp_path / "disk", "2m") as disk:
        database = Database(disk / "swarmfs.db", NODE)
        try:
            ballast = fill_disk(disk)
            with pytest.raises(sqlite3.OperationalError):
                for i in range(1000):  # until a commit needs a page the disk lacks
                    _create(database, b"big-%d" % i + b"x" * 200)
            ballast.unlink()
            _create(database, b"after")
            assert database.reader.by_path(b"after") is not None
        finally:
            database.close()


async def test_a_checkpoint_behind_a_closed_database_does_nothing(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """The checkpoint task may run after the node closed the database: it used to run
    on the closed connection and log a warning (failing log-checking tests)."""
    db._writes = CHECKPOINT_EVERY - 1
    await db.write(lambda t: t.save_peer(PEER, "127.0.0.1:1", time.time()), small=True)
    assert db._checkpointing, "the write started a checkpoint"
    db.close()
    with trio.fail_after(10):
        while db._checkpointing:  # the task ends once its worker thread has
            await trio.sleep(0.01)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_transaction_that_does_not_commit_runs_its_undo_hooks(db: Database) -> None:
    """Index sync notes which peer sent each applied change inside the transaction, before
    its commit; if it rolls back, the freed sequence numbers go to other changes, which
    must not be taken for that peer's (it would never be sent them)."""
    before = db.sequence
    undone: list[int] = []

    def fails(t: Txn) -> None:
        seq = t.next_sequence()
        t.on_rollback.append(lambda: undone.append(seq))
        raise RuntimeError("apply failed")

    with pytest.raises(RuntimeError):
        db.write_sync(fails)
    assert undone == [before + 1], "the undo hook ran"
    assert db.sequence == before == db.reader.sequence(), "the sequence number is free again"


def test_a_database_from_before_loses_the_index_every_file_change_paid_for(
    tmp_path: Path,
) -> None:
    """``records_kinds`` (parent, kind, deleted) was written by every file create and
    delete; the partial ``records_subdirs`` serves the same count and only directories
    touch it (create/delete transactions ~14 % cheaper)."""
    first = Database(tmp_path / "swarmfs.db", NODE)
    first._writer.execute("DROP INDEX records_subdirs")
    first._writer.execute("CREATE INDEX records_kinds ON records(parent, kind, deleted)")
    _create(first, b"d", Kind.DIR)
    _create(first, b"d/sub", Kind.DIR)
    _create(first, b"d/file")
    first.close()
    db = Database(tmp_path / "swarmfs.db", NODE)
    try:
        names = {r[0] for r in db.reader.conn.execute("SELECT name FROM sqlite_master")}
        assert "records_kinds" not in names and "records_subdirs" in names
        plan = db.reader.conn.execute(
            "EXPLAIN QUERY PLAN SELECT COUNT(*) FROM records"
            " WHERE parent=? AND deleted=0 AND kind='dir'",
            (b"d",),
        ).fetchall()
        assert "records_subdirs" in str(plan)
        assert db.reader.count_subdirs(b"d") == 1
    finally:
        db.close()
