"""``swarmfs trash list`` / ``restore``: on a running node, offline, and across two nodes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from mounted import SwarmMount, wait_until
from test_ux import content, ok, one_line_error, pair, swarmfs

from swarmfs.errors import UserError
from swarmfs.trash import swarm_path

SYNC_TIMEOUT = 30.0

pytestmark = pytest.mark.mounted


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a/b", b"a/b"),
        ("/a/b", b"a/b"),
        ("a//b/", b"a/b"),
        ("/mnt/swarm/a/b", b"a/b"),
        ("/mnt/swarmy/a", b"mnt/swarmy/a"),
        ("mnt/swarm/a", b"mnt/swarm/a"),  # relative: always a swarm path
    ],
)
def test_swarm_path(text: str, expected: bytes) -> None:
    assert swarm_path(text, Path("/mnt/swarm")) == expected


@pytest.mark.parametrize("text", ["", "/", "a/../b", "./a"])
def test_swarm_path_refuses(text: str) -> None:
    with pytest.raises(UserError):
        swarm_path(text, None)


def trash_paths(node: SwarmMount) -> list[str]:
    """The PATH column of ``trash list``, most recent first."""
    lines = ok(swarmfs("trash", "list", data_dir=node.data_dir)).stdout.splitlines()
    if lines == ["the trash is empty"]:
        return []
    assert lines[0].split() == ["DELETED", "BY", "SIZE", "PATH"]
    return [line.split("  ")[-1] for line in lines[1:]]


def test_list_and_restore_on_a_running_node(mount_factory: Callable[..., SwarmMount]) -> None:
    node = mount_factory()
    assert ok(swarmfs("trash", "list", data_dir=node.data_dir)).stdout == "the trash is empty\n"
    (node.mountpoint / "d").mkdir()
    (node.mountpoint / "d" / "f.txt").write_bytes(b"one")
    (node.mountpoint / "d" / "f.txt").unlink()
    (node.mountpoint / "d" / "f.txt").write_bytes(b"two, longer")
    (node.mountpoint / "d" / "f.txt").unlink()
    (node.mountpoint / "d").rmdir()
    result = ok(swarmfs("trash", "list", data_dir=node.data_dir))
    assert trash_paths(node) == ["d/f.txt", "d/f.txt"]
    assert "11 B" in result.stdout.splitlines()[1]  # the newest first
    assert "2 deleted files; kept for 7 d after deletion" in result.stderr

    # MOUNTPOINT/a/b names the swarm path a/b; the newest deletion comes back,
    # with its directory.
    restored = ok(swarmfs("trash", "restore", node.mountpoint / "d/f.txt", data_dir=node.data_dir))
    assert restored.stdout == "restored d/f.txt\n"
    assert (node.mountpoint / "d" / "f.txt").read_bytes() == b"two, longer"
    assert trash_paths(node) == ["d/f.txt"]

    one_line_error(
        swarmfs("trash", "restore", "/d/f.txt", data_dir=node.data_dir), "d/f.txt exists"
    )
    one_line_error(
        swarmfs("trash", "restore", "nothing/here", data_dir=node.data_dir), "not in the trash"
    )
    (node.mountpoint / "d" / "f.txt").unlink()  # deleted again: a third entry, the newest
    ok(swarmfs("trash", "restore", "d/f.txt", data_dir=node.data_dir))
    assert (node.mountpoint / "d" / "f.txt").read_bytes() == b"two, longer"


def test_restore_under_a_file_is_refused(mount_factory: Callable[..., SwarmMount]) -> None:
    node = mount_factory()
    (node.mountpoint / "d").mkdir()
    (node.mountpoint / "d" / "f").write_bytes(b"x")
    (node.mountpoint / "d" / "f").unlink()
    (node.mountpoint / "d").rmdir()
    (node.mountpoint / "d").write_bytes(b"a file called d")
    one_line_error(
        swarmfs("trash", "restore", "d/f", data_dir=node.data_dir), "d is not a directory"
    )


def test_usage_errors(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    one_line_error(swarmfs("trash", "restore", data_dir=data_dir), "needs the PATH")
    one_line_error(swarmfs("trash", "list", "x", data_dir=data_dir), "takes no PATH")
    one_line_error(swarmfs("trash", "restore", "a/../b", data_dir=data_dir), "'..'")
    assert ok(swarmfs("trash", "list", data_dir=data_dir)).stdout == "the trash is empty\n"
    one_line_error(swarmfs("trash", "restore", "a", data_dir=data_dir), "not in the trash")
    result = swarmfs("trash", "empty", data_dir=data_dir)
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_offline_restore_reaches_the_mount_later(
    mount_factory: Callable[..., SwarmMount],
) -> None:
    node = mount_factory()
    (node.mountpoint / "f").write_bytes(b"kept")
    (node.mountpoint / "f").unlink()
    node.umount()
    assert trash_paths(node) == ["f"]
    result = ok(swarmfs("trash", "restore", "f", data_dir=node.data_dir))
    assert "restored f" in result.stdout and "not running" in result.stdout
    node.mount()
    assert (node.mountpoint / "f").read_bytes() == b"kept"


def test_restore_on_another_node_comes_back_everywhere(
    mount_factory: Callable[..., SwarmMount], tmp_path: Path
) -> None:
    a, b = pair(mount_factory, tmp_path)
    data = bytes(range(256)) * 5000  # more than one chunk
    (a.mountpoint / "doc.bin").write_bytes(data)
    wait_until(lambda: content(b.mountpoint / "doc.bin") == data, SYNC_TIMEOUT, "doc.bin on b")
    (a.mountpoint / "doc.bin").unlink()
    wait_until(
        lambda: not (b.mountpoint / "doc.bin").exists(), SYNC_TIMEOUT, "the delete to reach b"
    )
    assert trash_paths(b) == ["doc.bin"]
    ok(swarmfs("trash", "restore", "doc.bin", data_dir=b.data_dir))
    assert (b.mountpoint / "doc.bin").read_bytes() == data
    wait_until(lambda: content(a.mountpoint / "doc.bin") == data, SYNC_TIMEOUT, "doc.bin on a")
