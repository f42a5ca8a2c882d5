"""Replication between real nodes: what one mount writes, the others read (DESIGN.md §3, §5).

Each test starts a swarm of its own (a stalled link in one test must not
spill into the next), three nodes unless it needs another shape.
Content is compared with ``cmp`` and SHA-256 over the mounts, as a user would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from swarm_harness import (
    SYNC_TIMEOUT,
    Swarm,
    SwarmNode,
    bad_chunks,
    chunk_files,
    cmp_files,
    eventually,
    files_containing,
    tree_digests,
    wait_same,
)

pytestmark = pytest.mark.mounted

MiB = 1024 * 1024


@pytest.fixture
def nodes(swarm: Swarm) -> Iterator[list[SwarmNode]]:
    """Three running nodes of this test's own swarm; after the test, all still answer."""
    yield swarm.start(3)
    for node in swarm.nodes:
        assert node.answers(), f"{node.name}'s mount no longer answers"


@pytest.fixture
def name() -> str:
    """The directory each test works in (a directory, not the root, is what users share)."""
    return "work"


def test_big_random_file_reads_identically_everywhere(
    nodes: list[SwarmNode], name: str, tmp_path: Path
) -> None:
    a, b, c = nodes
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(20 * MiB + 12345))  # the last chunk is a short one
    (a.mnt / name).mkdir()
    subprocess.run(["cp", source, a.mnt / name / "big.bin"], check=True)
    cmp_files(source, a.mnt / name / "big.bin")
    for node in (b, c):
        target = node.mnt / name / "big.bin"
        eventually(
            lambda t=target: t.stat().st_size == source.stat().st_size,
            SYNC_TIMEOUT,
            f"big.bin's record on {node.name}",
        )
        cmp_files(source, target)


def test_tree_of_small_files_has_equal_checksums_everywhere(
    nodes: list[SwarmNode], name: str
) -> None:
    a, b, c = nodes
    root = b.mnt / name
    for i in range(200):
        path = root / f"d{i % 7}" / f"sub{i % 3}" / f"file{i:03}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"small file {i}\n".encode() * (i % 17 + 1))
    expected = tree_digests(root)
    assert sum(1 for v in expected.values() if v[0] == "file") == 200
    wait_same([a, c], expected, name)


def test_directory_rename_reaches_every_node(nodes: list[SwarmNode], name: str) -> None:
    a, b, c = nodes
    old = a.mnt / name / "project"
    (old / "src" / "pkg").mkdir(parents=True)
    (old / "docs").mkdir()
    (old / "src" / "pkg" / "mod.py").write_text("print('hello')\n")
    (old / "docs" / "readme.md").write_bytes(os.urandom(3 * MiB))  # more than one chunk
    (old / "top.txt").write_text("top\n")
    inner = tree_digests(old)
    wait_same([b, c], inner, f"{name}/project")

    subprocess.run(["mv", b.mnt / name / "project", b.mnt / name / "renamed"], check=True)

    for node in (a, b, c):
        eventually(
            lambda n=node: sorted(os.listdir(n.mnt / name)) == ["renamed"],
            SYNC_TIMEOUT,
            f"only renamed/ in {name} on {node.name}",
        )
    wait_same([a, b, c], inner, f"{name}/renamed")


def test_overwrite_shows_new_content_everywhere(
    nodes: list[SwarmNode], name: str, tmp_path: Path
) -> None:
    a, b, c = nodes
    (a.mnt / name).mkdir()
    first = os.urandom(2 * MiB + 100)
    (a.mnt / name / "f.bin").write_bytes(first)
    for node in (b, c):  # read everywhere, so kernel and chunk caches hold the old version
        eventually(
            lambda n=node: (n.mnt / name / "f.bin").read_bytes() == first,
            SYNC_TIMEOUT,
            f"first version on {node.name}",
        )

    # cp over the file (O_TRUNC) from another node, with a shorter new content
    second = tmp_path / "second.bin"
    second.write_bytes(os.urandom(MiB + 7))
    subprocess.run(["cp", second, b.mnt / name / "f.bin"], check=True)
    for node in (a, b, c):
        eventually(
            lambda n=node: cmp_files(second, n.mnt / name / "f.bin"),
            SYNC_TIMEOUT,
            f"second version on {node.name}",
        )

    # an in-place write that keeps the size (only the page cache can tell it changed)
    with open(c.mnt / name / "f.bin", "r+b") as f:
        f.seek(1000)
        f.write(b"X" * 5000)
    third = bytearray(second.read_bytes())
    third[1000:6000] = b"X" * 5000
    for node in (a, b, c):
        eventually(
            lambda n=node: (n.mnt / name / "f.bin").read_bytes() == third,
            SYNC_TIMEOUT,
            f"in-place edit on {node.name}",
        )


def test_delete_from_third_node_reaches_all(nodes: list[SwarmNode], name: str) -> None:
    a, b, c = nodes
    (a.mnt / name).mkdir()
    for i in range(5):
        (a.mnt / name / f"f{i}").write_text(f"file {i}\n")
    expected = tree_digests(a.mnt / name)
    wait_same([b, c], expected, name)

    subprocess.run(["rm", c.mnt / name / "f1", c.mnt / name / "f3"], check=True)

    del expected["f1"], expected["f3"]
    wait_same([a, b, c], expected, name)
    for node in (a, b, c):
        assert not (node.mnt / name / "f1").exists()


def test_no_plaintext_in_any_data_dir(nodes: list[SwarmNode], name: str) -> None:
    """Content is ciphertext at rest on every node: writer, replicas and readers' caches."""
    a, b, c = nodes
    marker = b"SWARMFS-PLAINTEXT-MARKER-" + os.urandom(8).hex().encode()
    small = marker + b"\n"
    big = (marker + b" " + os.urandom(100)) * (3 * MiB // 140)  # several chunks of markers
    (a.mnt / name).mkdir()
    (a.mnt / name / "small.txt").write_bytes(small)
    (a.mnt / name / "big.txt").write_bytes(big)
    # a partial chunk still open (staged) while we look
    with open(a.mnt / name / "open.txt", "wb") as f:
        f.write(marker * 10)
        f.flush()
        for node in (b, c):  # reading makes the readers cache every chunk
            eventually(
                lambda n=node: (
                    (n.mnt / name / "big.txt").read_bytes() == big
                    and (n.mnt / name / "small.txt").read_bytes() == small
                ),
                SYNC_TIMEOUT,
                f"the marker files on {node.name}",
            )
        # the search itself works: it finds the marker where it is plaintext
        assert len(files_containing(a.mnt / name, marker)) == 3
        for node in (a, b, c):
            assert chunk_files(node.dir), f"{node.name} stores no chunks at all"
            found = files_containing(node.dir, marker)
            assert not found, f"plaintext on {node.name}'s disk: {found}"
            assert not bad_chunks(node.dir)


@pytest.mark.slow
def test_replicas_1_reader_fetches_on_read_and_keeps(swarm: Swarm, tmp_path: Path) -> None:
    a = swarm.add("a", replicas=1)
    b = swarm.add("b", replicas=1)
    a.start()
    b.start()
    swarm.wait_connected([a, b])
    source = tmp_path / "data.bin"
    source.write_bytes(os.urandom(5 * MiB + 1))
    shutil.copyfile(source, a.mnt / "data.bin")

    eventually(
        lambda: (b.mnt / "data.bin").stat().st_size == source.stat().st_size,
        SYNC_TIMEOUT,
        "data.bin's record on b",
    )
    writer = eventually(
        lambda: (s := a.status())["backlog"]["chunks"] == 0 and s, SYNC_TIMEOUT, "a's backlog"
    )
    assert writer["bytes_stored"] >= source.stat().st_size
    before = b.status()
    assert before["files"] == 1
    assert (before["bytes_stored"], before["bytes_cached"]) == (0, 0), before
    assert chunk_files(b.dir) == []

    cmp_files(source, b.mnt / "data.bin")

    after = b.status()
    assert after["bytes_stored"] == 0, after  # a cached copy, not a pinned replica
    assert after["bytes_cached"] >= source.stat().st_size, after
    assert len(chunk_files(b.dir)) == 6
    assert not bad_chunks(b.dir)
    # kept: b still reads it with a gone
    a.stop()
    cmp_files(source, b.mnt / "data.bin")
    assert b.status()["bytes_cached"] == after["bytes_cached"]
