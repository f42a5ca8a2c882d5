"""Replication when nodes go away: offline catch-up, partitions, ``kill -9`` (DESIGN.md §3, §6).

Real processes on loopback (``swarm`` fixture, tests/swarm_harness.py); a
partition is made by stopping a node, a crash by SIGKILL to the pid in
``DIR/swarmfs.pid``. Every scenario ends with all nodes agreeing on the whole
tree, compared by SHA-256 over the mounts.
"""

from __future__ import annotations

import os
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from swarm_harness import (
    CONNECT_TIMEOUT,
    SYNC_TIMEOUT,
    RefTree,
    Swarm,
    SwarmNode,
    bad_chunks,
    chunk_files,
    cmp_files,
    eventually,
    tree_digests,
    wait_same,
)

pytestmark = pytest.mark.mounted

MiB = 1024 * 1024
CONFLICT = re.compile(r"^notes\.sync-conflict-(\d{8}-\d{6})-([a-z2-7]{8})\.txt$")


def test_offline_node_catches_up_on_writes_and_deletes(swarm: Swarm, tmp_path: Path) -> None:
    a, b, c = swarm.start(3)
    ref = RefTree(tmp_path / "reference")
    ref.mkdir(a, "dir")
    ref.write(a, "dir/inner.txt", b"inner\n")
    for stem in ("keep", "doomed1", "doomed2"):
        ref.write(a, f"{stem}.txt", f"{stem} v1\n".encode())
    wait_same([a, b, c], ref.expected(), what="the first files")

    c.stop()
    ref.write(a, "new.bin", os.urandom(2 * MiB + 5))
    ref.write(a, "keep.txt", b"keep v2, written while c was away\n")
    ref.unlink(b, "doomed1.txt")
    ref.unlink(a, "doomed2.txt")
    ref.rename(b, "dir", "moved")
    ref.write(b, "from-b.txt", b"b wrote this while c was away\n")
    wait_same([a, b], ref.expected(), what="a and b to agree")

    c.start()
    wait_same([c], ref.expected(), what="c's catch-up")
    # Nothing c had before it left comes back: its own later write reaches a and b
    # behind anything it could have re-announced, and the trees are still exact.
    ref.write(c, "sentinel.txt", b"c is back\n")
    wait_same([a, b, c], ref.expected(), what="c's sentinel and no resurrected files")
    assert c.status()["files"] == a.status()["files"] == b.status()["files"] == 5


def test_concurrent_edits_while_apart_keep_both_versions(swarm: Swarm) -> None:
    a, b = swarm.start(2)
    (a.mnt / "notes.txt").write_text("base\n")
    wait_same([b], tree_digests(a.mnt), what="the base version")

    b.stop()
    (a.mnt / "notes.txt").write_text("edited on a while b was away\n")
    a_mtime_ns = (a.mnt / "notes.txt").stat().st_mtime_ns
    a.stop()
    b.start()  # alone: its bootstrap peer is down
    assert not b.connected_peers()
    (b.mnt / "notes.txt").write_text("edited on b while a was away\n")
    a.start()
    swarm.wait_connected([a, b])

    def both_kept(node: SwarmNode) -> dict[str, str]:
        names = sorted(os.listdir(node.mnt))
        assert len(names) == 2 and "notes.txt" in names, names
        return {n: (node.mnt / n).read_text() for n in names}

    seen = [eventually(lambda n=node: both_kept(n), SYNC_TIMEOUT, f"both versions on {node.name}")
            for node in (a, b)]  # fmt: skip
    assert seen[0] == seen[1], seen  # every node made the identical conflict copy
    versions = seen[0]
    # the later edit (b's) keeps the name; a's is the conflict copy, named after a
    assert versions["notes.txt"] == "edited on b while a was away\n"
    [(copy, text)] = [(n, t) for n, t in versions.items() if n != "notes.txt"]
    assert text == "edited on a while b was away\n"
    match = CONFLICT.match(copy)
    assert match, copy
    stamp = datetime.fromtimestamp(a_mtime_ns / 1e9, UTC).strftime("%Y%m%d-%H%M%S")
    assert match.groups() == (stamp, a.node_id[:8]), (copy, stamp, a.node_id)


@pytest.mark.slow
def test_kill9_mid_push_finishes_after_restart(swarm: Swarm, tmp_path: Path) -> None:
    a, b = swarm.start(2)
    source = tmp_path / "fifty.bin"
    source.write_bytes(os.urandom(50 * MiB + 333))
    n_chunks = 51
    subprocess.run(["cp", source, a.mnt / "fifty.bin"], check=True)
    # Kill as soon as the first chunks have reached b: committed, pushed only in part.
    eventually(lambda: chunk_files(b.dir), SYNC_TIMEOUT, "the push to start")
    a.kill9()
    pushed_before_crash = len(chunk_files(b.dir))
    assert pushed_before_crash < n_chunks, "the push was over before the kill: nothing tested"
    for node in (a, b):
        assert not bad_chunks(node.dir)

    a.expect_log(r"cleared .*left dead by a crashed node")
    a.start()
    cmp_files(source, a.mnt / "fifty.bin")  # close() returned, so it survived the crash
    status = eventually(
        lambda: (s := a.status())["backlog"] == {"chunks": 0, "bytes": 0, "records": 0} and s,
        SYNC_TIMEOUT + CONNECT_TIMEOUT,
        "a's backlog to drain after the restart",
    )
    assert status["bytes_stored"] >= source.stat().st_size
    replica = b.status()
    assert replica["bytes_stored"] >= source.stat().st_size, (pushed_before_crash, replica)
    assert len(chunk_files(b.dir)) == n_chunks
    eventually(lambda: cmp_files(source, b.mnt / "fifty.bin"), SYNC_TIMEOUT, "fifty.bin on b")
    for node in (a, b):
        assert not bad_chunks(node.dir)
        leftovers = list((node.dir / "chunks" / "tmp").iterdir())
        assert not leftovers, f"{node.name}: half-written chunks left in tmp: {leftovers}"
