"""Shared fixtures: a one-node mount per module, fresh mounts per test, log checks.

Mounted fixtures skip (with the precise reason) only where FUSE is truly
absent; every mount they make is unmounted in teardown even when the test
failed, and the node's log must be free of unexpected warnings (habit 11).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from mounted import SwarmMount, fuse_unavailable

if TYPE_CHECKING:
    from swarm_harness import Swarm


def _require_fuse() -> None:
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(f"FUSE unavailable: {reason}")


def _take_down(mount: SwarmMount) -> list[str]:
    """Unmount through the real command (falling back to force), return log problems."""
    problems: list[str] = []
    try:
        if mount.pid is not None and mount.is_mounted():
            mount.umount()
    except AssertionError as exc:
        problems.append(f"umount failed: {exc}")
    finally:
        mount.cleanup()
    return problems + mount.log_problems()


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwarmMount]:
    """One node mounted for a whole module (mounting costs a process start)."""
    _require_fuse()
    mount = SwarmMount(tmp_path_factory.mktemp("shared"))
    try:
        mount.mount()
        yield mount
    finally:
        problems = _take_down(mount)
    if problems:
        pytest.fail("shared mount teardown:\n" + "\n".join(problems))


@pytest.fixture
def mnt(shared_mount: SwarmMount, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory of its own in the shared mount; the node's log is checked after."""
    if not shared_mount.answers():
        pytest.fail("the shared mount died in an earlier test")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:120]
    workdir = shared_mount.mountpoint / name
    workdir.mkdir()
    shared_mount.log_problems()  # anything before this test is not its fault
    yield workdir
    problems = shared_mount.log_problems()
    if not shared_mount.answers():
        problems.append("the mount no longer answers after this test")
    if problems:
        pytest.fail("node log / mount state after the test:\n" + "\n".join(problems))


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[Callable[..., SwarmMount]]:
    """Make (and mount) nodes of this test's own; all are taken down afterwards."""
    _require_fuse()
    made: list[SwarmMount] = []

    def make(name: str = "node") -> SwarmMount:
        mount = SwarmMount(tmp_path, name)
        made.append(mount)
        mount.mount()
        return mount

    yield make
    problems: list[str] = []
    for mount in made:
        problems += _take_down(mount)
    if problems:
        pytest.fail("node log / teardown:\n" + "\n".join(problems))


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[Swarm]:
    """Real nodes on loopback for multi-node scenarios (tests/swarm_harness.py)."""
    from swarm_harness import swarm_at  # only the multi-node tests need it

    with swarm_at(tmp_path) as nodes:
        yield nodes
