"""``kill -9`` at the worst moments, then restart (DESIGN.md §6 "Crash at any point").

Each test runs real nodes, kills one with SIGKILL (its pid from
``DIR/swarmfs.pid``) at a chosen point — half-way through a large write, right
after ``close()`` returned, while chunks are being pushed, while an index is
being pulled, while garbage collection deletes — and restarts it with
``swarmfs mount``, which must clear the dead mount by itself. Afterwards:

- every file closed before the kill is intact on its node and reaches every
  node once they have reconverged;
- a file being written when the node died shows its last committed version;
- every file under ``DIR/chunks/ab/cd/<id>`` hashes to its name (no partial
  chunk stored, so none can be served), ``chunks/tmp`` is emptied at start,
  and ``swarmfs fsck`` has nothing to repair.

"During a push" and "during index sync" need a transfer that lasts: those
run in network namespaces (tests/netns.py) with the receiver's link limited
by ``tbf``, so the kill lands while the transfer is visibly in progress.
"""

from __future__ import annotations

import contextlib
import errno
import random
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultkit import (
    FULL,
    MiB,
    Writer,
    assert_sound,
    chunk_ids,
    crash,
    digest,
    payload,
    wait_backlog_empty,
)
from mounted import process_alive, wait_until
from netns import FaultSwarm, loopback_swarm, netns_swarm, tools_missing
from swarm_harness import SYNC_TIMEOUT, SwarmNode, eventually, require_fuse

pytestmark = pytest.mark.mounted

CONVERGE = 60.0
"""Seconds for a restarted node to catch up (reconnect backoff included)."""


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[FaultSwarm]:
    with loopback_swarm(tmp_path) as nodes:
        yield nodes


def _write_closed_files(node: SwarmNode, prefix: str, count: int, seed: int) -> dict[str, str]:
    """Files written and closed on ``node``: name -> sha256."""
    rng = random.Random(seed)
    out = {}
    for i in range(count):
        data = payload(rng.choice([0, 1, 4096, 300_000, MiB, 2 * MiB + 17]), seed * 100 + i)
        name = f"{prefix}{i}.bin"
        (node.mnt / name).write_bytes(data)
        out[name] = digest(data)
    return out


def _assert_files(node: SwarmNode, files: dict[str, str]) -> bool:
    for name, want in files.items():
        got = digest((node.mnt / name).read_bytes())
        assert got == want, f"{name} on {node.name}: content differs"
    return True


def _converged(nodes: list[SwarmNode], files: dict[str, str], timeout: float = CONVERGE) -> None:
    for node in nodes:
        eventually(lambda n=node: _assert_files(n, files), timeout, f"every file on {node.name}")


def test_kill_during_a_large_write_keeps_every_closed_file(swarm: FaultSwarm) -> None:
    a, b = swarm.start(2)
    closed = _write_closed_files(a, "before", 4, seed=1)
    size = (200 if FULL else 50) * MiB
    before_write = chunk_ids(a.data_dir)
    writer = Writer(a.mnt / "big.bin", size, seed=2, pause_at=size // 2)
    writer.start()
    assert writer.paused.wait(120), f"writer stuck at {writer.written} bytes: {writer.error}"
    crash(a)  # half of the file written, the file still open
    writer.resume.set()
    writer.join(60)
    assert not writer.is_alive()
    assert writer.error is not None and not writer.closed, "writes went on after the kill"
    assert writer.error.errno in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED), writer.error
    stray = len(chunk_ids(a.data_dir) - before_write)

    a.start()
    swarm.wait_connected()
    _assert_files(a, closed)
    big = a.mnt / "big.bin"
    # never closed: its last committed version is the empty file open(O_CREAT) made, or none
    assert not big.exists() or big.stat().st_size == 0
    _converged([b], closed)
    left = len(chunk_ids(a.data_dir) - before_write)
    print(
        f"uncommitted chunks of the killed write: {stray} on disk at the kill, {left} after restart"
    )
    for node in (a, b):
        assert_sound(node, after_restart=node is a)
    # the node works on: the same name can be written again and replicates
    data = payload(3 * MiB, 3)
    big.write_bytes(data)
    _converged([b], {"big.bin": digest(data)})


def test_kill_right_after_close_keeps_the_file(swarm: FaultSwarm, tmp_path: Path) -> None:
    a, b = swarm.start(2)
    files: dict[str, str] = {}
    for round_ in range(3):
        src = tmp_path / f"src{round_}"
        data = payload([5, MiB + 1, 3 * MiB][round_] * (round_ + 1), 10 + round_)
        src.write_bytes(data)
        name = f"copied{round_}.bin"
        subprocess.run(["cp", src, a.mnt / name], check=True, timeout=60)
        crash(a)  # cp has returned: close() committed the file
        files[name] = digest(data)
        a.start()
        _assert_files(a, files)
    swarm.wait_connected()
    _converged([b], files)
    assert_sound(a)
    assert_sound(b, after_restart=False)


def _netns_ready() -> None:
    require_fuse()
    reason = tools_missing()
    if reason is not None:
        pytest.skip(reason)


def _new_chunks_on(node: SwarmNode, wanted: set[str]) -> int:
    return len(chunk_ids(node.data_dir) & wanted)


@pytest.mark.slow
def test_kill_receiver_then_sender_during_a_push(tmp_path: Path) -> None:
    _netns_ready()
    with netns_swarm(tmp_path, 2) as (lab, swarm):
        a, b = swarm.start(2)
        lab.rate("80mbit")  # about 10 MB/s towards each node: a push of 24 MB lasts seconds
        size = 24 * MiB

        # 1. the receiver dies with chunk_put frames in flight
        before = chunk_ids(a.data_dir)
        data1 = payload(size, 21)
        (a.mnt / "one.bin").write_bytes(data1)
        pushed = chunk_ids(a.data_dir) - before
        assert len(pushed) >= 24
        eventually(lambda: _new_chunks_on(b, pushed) >= 3, 60, "the push to reach b")
        got = _new_chunks_on(b, pushed)
        crash(b)
        assert got < len(pushed), "the push was over before the kill"
        assert_sound(b, after_restart=False)  # half-received chunks never under their id
        b.start()
        swarm.wait_connected()
        assert_sound(b)

        # 2. the sender dies with a backlog
        before = chunk_ids(a.data_dir)
        data2 = payload(size, 22)
        (a.mnt / "two.bin").write_bytes(data2)
        pushed2 = chunk_ids(a.data_dir) - before
        eventually(lambda: _new_chunks_on(b, pushed2) >= 3, 60, "the second push to reach b")
        crash(a)
        assert _new_chunks_on(b, pushed2) < len(pushed2), "the push was over before the kill"
        a.start()
        swarm.wait_connected()

        files = {"one.bin": digest(data1), "two.bin": digest(data2)}
        _converged([a, b], files)
        wait_backlog_empty(a, CONVERGE)
        assert pushed | pushed2 <= chunk_ids(b.data_dir), "b lacks chunks it should hold"
        for node in (a, b):
            assert_sound(node)


# Ten levels of 240-byte names: each record of the tree is estimated at ~2.7 KB, so a's
# index (~420 records) goes out in three pages of 512 KB (swarmfs/meta/sync.py PAGE_BYTES),
# each about two seconds at 2 mbit, and b applies it page by page.
DEEP = "/".join(f"level{i}-" + "x" * 232 for i in range(10))


def _files_in_db(data_dir: Path) -> int:
    """Live files in a stopped node's database, as ``swarmfs status`` counts them."""
    uri = f"file:{data_dir / 'swarmfs.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        (n,) = db.execute(
            "SELECT COUNT(*) FROM records WHERE deleted=0 AND hidden=0 AND kind!='dir'"
        ).fetchone()
    return int(n)


@pytest.mark.slow
def test_kill_during_index_sync(tmp_path: Path) -> None:
    _netns_ready()
    with netns_swarm(tmp_path, 2) as (lab, swarm):
        a, b = swarm.start(2)
        b.stop()
        names = []
        for d in range(10):
            (a.mnt / "tree" / DEEP / f"d{d}").mkdir(parents=True)
            for f in range(40):
                rel = f"tree/{DEEP}/d{d}/f{f}"
                (a.mnt / rel).write_bytes(_body(rel))
                names.append(rel)
        deleted = names[::7]
        for rel in deleted:
            (a.mnt / rel).unlink()
        live = sorted(set(names) - set(deleted))
        lab.rate("2mbit", nodes=[1])  # the index pages towards b take seconds each
        b.start()

        def first_page_applied() -> int:
            held = b.status()["files"]
            assert held > 0, "no file yet"
            return held

        seen = eventually(first_page_applied, 60, "b to apply the first page of a's index")
        crash(b)
        files_at_kill = _files_in_db(b.data_dir)  # what b had committed when it died
        print(f"b held {files_at_kill} of {len(live)} files when killed (status said {seen})")
        assert 0 < files_at_kill < len(live), "the kill did not land in the middle of the sync"
        lab.rate(None)
        b.start()
        swarm.wait_connected()

        def same_tree() -> bool:
            for rel in live:
                assert (b.mnt / rel).read_bytes() == _body(rel), rel
            for rel in deleted:
                assert not (b.mnt / rel).exists(), f"deleted {rel} came back"
            return True

        eventually(same_tree, CONVERGE, "b to catch up on a's tree")
        tree = b.mnt / "tree" / DEEP
        assert sorted(f"tree/{DEEP}/{p.relative_to(tree)}" for p in tree.rglob("f*")) == live
        for node in (a, b):
            assert_sound(node)


def _body(rel: str) -> bytes:
    """A small content per file (the paths are long; the chunks must not fill the link)."""
    return rel[-8:].encode() * 3


@pytest.mark.slow
def test_kill_during_garbage_collection(swarm: FaultSwarm) -> None:
    a, b = swarm.start(2)
    keep = _write_closed_files(a, "keep", 5, seed=31)
    before = chunk_ids(a.data_dir)
    doomed = a.mnt / "doomed"
    doomed.mkdir()
    for i in range(600):
        (doomed / f"t{i}").write_bytes(payload(2000, 1000 + i))
    trash_chunks = chunk_ids(a.data_dir) - before
    shutil.rmtree(doomed)
    _converged([b], keep)
    eventually(lambda: not (b.mnt / "doomed").exists(), SYNC_TIMEOUT, "the delete to reach b")
    a.stop()
    # expire the trash at once: the node's first collection then deletes ~600 chunks
    (a.data_dir / "config.toml").write_text("trash_retention = 0\n")
    watch = [a.data_dir / "chunks" / c[:2] / c[2:4] / c for c in sorted(trash_chunks)]
    # ``swarmfs mount`` returns once mounted; the collection may be over by then
    launcher = subprocess.Popen(
        a.mount_command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        a.adopt(wait_until(a._read_pid, 30, "the node's pid file", interval=0.001))
        deadline = time.monotonic() + 30
        while all(p.exists() for p in watch[::25]) and time.monotonic() < deadline:
            pass  # spin: the first deletion is the moment to strike
        crash(a)
    finally:
        launcher.wait(timeout=60)
    left = sum(p.exists() for p in watch)
    print(f"garbage collection killed with {left} of {len(watch)} trash chunks left")
    a.start()
    swarm.wait_connected()
    _assert_files(a, keep)
    assert not (a.mnt / "doomed").exists(), "deleted files came back after the crash"
    assert_sound(a)
    eventually(lambda: not any(p.exists() for p in watch), 30, "the expired trash to be collected")
    new = _write_closed_files(a, "after", 2, seed=32)
    _converged([b], {**keep, **new})
    assert not (b.mnt / "doomed").exists()
    assert process_alive(a.pid or -1)
    assert_sound(b, after_restart=False)
