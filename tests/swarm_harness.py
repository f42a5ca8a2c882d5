"""Multi-node scenarios with real processes on real mounts (DESIGN.md §7, KBFS's style).

A ``Swarm`` starts ``swarmfs`` nodes on loopback, each a ``SwarmNode`` (a
``mounted.SwarmMount`` with a fixed listen port and the swarm's key), and
takes every one of them down again however the test ended: ``swarmfs
umount``, then ``fusermount3 -uz``, and SIGKILL only for the pids this harness
saw start (from ``DIR/swarmfs.pid``), never by name.

The vocabulary of a scenario::

    a, b, c = swarm.start(3)            # b and c bootstrapped from a, one swarm key
    (a.mnt / "f").write_bytes(data)     # as(a, write(...)): plain file system calls
    swarm.eventually(lambda: (b.mnt / "f").read_bytes() == data, 10, "f on b")
    b.stop(); ...; b.start()            # partition and heal by taking a node away
    a.kill9()                           # a crash; the mount is left dead until start()

``eventually`` polls a predicate against a deadline; an ``AssertionError`` or
``OSError`` from the predicate counts as "not yet" and is quoted if time runs
out. Nothing here sleeps for a fixed time.

Ports are found by binding port 0 and are then fixed per node, so a restarted
node listens where its peers remember it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from mounted import SwarmMount, fuse_unavailable, process_alive, run, swarmfs_command
from ports import free_port

T = TypeVar("T")

SYNC_TIMEOUT = 15.0
"""Seconds a change may take to reach another node on loopback (the contract says ~1 s;
less than the nodes' 30 s request timeout, so a stalled link fails instead of recovering)."""
CONNECT_TIMEOUT = 20.0
"""Seconds for nodes to find and authenticate each other (backoff starts at 1 s)."""


def eventually(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s.

    An ``AssertionError`` or ``OSError`` raised by the predicate means "not
    yet"; the last one is quoted in the failure.
    """
    deadline = time.monotonic() + timeout
    interval = 0.01
    last: BaseException | None = None
    while True:
        try:
            value = predicate()
        except (AssertionError, OSError) as exc:
            last, value = exc, None
        else:
            last = None
        if value:
            return value
        if time.monotonic() > deadline:
            why = f"; last: {type(last).__name__}: {last}" if last is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{why}")
        time.sleep(interval)
        interval = min(interval * 2, 0.2)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def tree_digests(root: Path) -> dict[str, tuple[str, ...]]:
    """Every entry under ``root``: directories as ("dir",), files as ("file", size, sha256).

    Conflict copies are included (they are files like any other).
    """
    out: dict[str, tuple[str, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[str(Path(dirpath, name).relative_to(root))] = ("dir",)
        for name in filenames:
            path = Path(dirpath, name)
            out[str(path.relative_to(root))] = (
                "file",
                str(path.stat().st_size),
                sha256_file(path),
            )
    return out


def tree_listing(root: Path) -> dict[str, tuple[str, ...]]:
    """``tree_digests`` without the checksums: names, kinds and sizes from ``lstat`` alone.

    It never reads content, so it cannot wait on a chunk fetch: a node's
    namespace is answered from its own database.
    """
    out: dict[str, tuple[str, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[str(Path(dirpath, name).relative_to(root))] = ("dir",)
        for name in filenames:
            path = Path(dirpath, name)
            out[str(path.relative_to(root))] = ("file", str(path.lstat().st_size))
    return out


def wait_same(
    nodes: list[SwarmNode],
    expected: dict[str, tuple[str, ...]],
    rel: str = "",
    what: str = "the tree",
    timeout: float = SYNC_TIMEOUT,
) -> None:
    """Until ``rel`` on every node has the ``expected`` ``tree_digests``, one deadline for all.

    Names and sizes first (no reads), then content, so a missing record fails
    at the deadline instead of inside a read that waits for a fetch.
    """
    deadline = time.monotonic() + timeout
    shape = {k: v[:2] for k, v in expected.items()}
    for check, kind in ((tree_listing, "names and sizes"), (tree_digests, "content")):
        want = shape if check is tree_listing else expected
        for node in nodes:
            root = node.mnt / rel
            left = max(deadline - time.monotonic(), 0.5)
            eventually(
                lambda c=check, r=root, w=want: _same(c(r), w),
                left,
                f"{what}'s {kind} on {node.name}",
            )
    # A read that hung in a fetch can make a check pass long after the deadline.
    late = time.monotonic() - deadline
    assert late <= 1.0, f"{what} took {timeout + late:.1f} s to reach every node"


def _same(got: dict[str, tuple[str, ...]], want: dict[str, tuple[str, ...]]) -> bool:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    differ = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    assert not (missing or extra or differ), (
        f"{len(missing)} missing {missing[:5]}, {len(extra)} extra {extra[:5]},"
        f" {len(differ)} differ {differ[:5]}"
    )
    return True


def cmp_files(a: Path, b: Path) -> bool:
    """``cmp`` says the two files are identical (the real tool, as a user would check)."""
    result = subprocess.run(["cmp", a, b], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"cmp {a} {b}: {result.stdout}{result.stderr}".strip()
    return True


def chunk_files(data_dir: Path) -> list[Path]:
    """Every chunk stored under its id: ``DIR/chunks/ab/cd/<id>`` (not ``chunks/tmp``)."""
    root = data_dir / "chunks"
    if not root.exists():
        return []
    return sorted(p for p in root.glob("??/??/*") if p.is_file())


def bad_chunks(data_dir: Path) -> list[str]:
    """Chunk files whose SHA-256 is not their name, or that sit in the wrong directory."""
    bad = []
    for path in chunk_files(data_dir):
        name = path.name
        where = f"{path.parent.parent.name}/{path.parent.name}"
        if where != f"{name[:2]}/{name[2:4]}":
            bad.append(f"{path}: stored under {where}")
        elif sha256_file(path) != name:
            bad.append(f"{path}: content hashes to {sha256_file(path)}")
    return bad


def files_containing(root: Path, marker: bytes) -> list[str]:
    """Files under ``root`` that contain ``marker`` (``grep -rl``, binary files included)."""
    result = subprocess.run(
        ["grep", "-rlaF", "--", marker.decode(), str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode in (0, 1), f"grep failed: {result.stderr}"
    return result.stdout.splitlines()


class RefTree:
    """A plain directory that gets every operation a scenario does on some node's mount.

    ``expected()`` is what every node must show once the swarm has converged,
    without trusting any node's view to say so.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def write(self, node: SwarmNode, rel: str, data: bytes) -> None:
        for base in (node.mnt, self.root):
            (base / rel).write_bytes(data)

    def mkdir(self, node: SwarmNode, rel: str) -> None:
        for base in (node.mnt, self.root):
            (base / rel).mkdir()

    def unlink(self, node: SwarmNode, rel: str) -> None:
        for base in (node.mnt, self.root):
            (base / rel).unlink()

    def rename(self, node: SwarmNode, old: str, new: str) -> None:
        for base in (node.mnt, self.root):
            (base / old).rename(base / new)

    def expected(self) -> dict[str, tuple[str, ...]]:
        return tree_digests(self.root)


class SwarmNode(SwarmMount):
    """One node of a ``Swarm``: a mount plus its address, key and options."""

    def __init__(self, swarm: Swarm, name: str, port: int) -> None:
        super().__init__(swarm.base, name)
        self.swarm = swarm
        self.name = name
        self.port = port
        self.listen = f"127.0.0.1:{port}"
        self.bootstrap: list[str] = []
        self.swarm_key_file: Path | None = None
        self.replicas: str | None = None
        self._node_id: str | None = None

    def __repr__(self) -> str:
        return f"<node {self.name} {self.listen}>"

    @property
    def mnt(self) -> Path:
        return self.mountpoint

    @property
    def dir(self) -> Path:
        return self.data_dir

    @property
    def address(self) -> str:
        return self.listen

    @property
    def node_id(self) -> str:
        if self._node_id is None:
            self._node_id = self.status()["node_id"]
        assert self._node_id
        return self._node_id

    # -- life cycle ---------------------------------------------------------------------
    def start(self, *, bootstrap: bool = True) -> None:
        """``swarmfs mount``; ``bootstrap=False`` leaves the remembered peers to find the swarm."""
        args: list[str] = []
        if self.swarm_key_file is not None:
            args += ["--swarm-key-file", str(self.swarm_key_file)]
        if bootstrap:
            for address in self.bootstrap:
                args += ["--bootstrap", address]
        if self.replicas is not None:
            args += ["--replicas", self.replicas]
        self.mount_args = args
        self.mount()
        self.swarm.running.add(self)

    def stop(self) -> None:
        """``swarmfs umount``: flush, replicate what it can, unmount, and wait for the exit."""
        self.umount()
        self.swarm.running.discard(self)

    def kill9(self) -> None:
        super().kill9()
        self.swarm.running.discard(self)

    # -- observation --------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """``swarmfs status --json`` for this node's data dir."""
        result = run(
            [*swarmfs_command(), "status", "--data-dir", self.data_dir, "--json"], timeout=30
        )
        return json.loads(result.stdout)

    def connected_peers(self) -> set[str]:
        return {p["id"] for p in self.status()["peers"] if p["connected"]}

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Swarm:
    """Nodes of one swarm on loopback; a context manager that always takes them down."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.nodes: list[SwarmNode] = []
        self.running: set[SwarmNode] = set()

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        problems = self.close()
        if not problems:
            return
        report = "swarm teardown / node logs:\n" + "\n".join(problems)
        if exc_info[0] is None:
            pytest.fail(report)
        print(report)  # the test failed already; its captured output shows these

    def __iter__(self) -> Iterator[SwarmNode]:
        return iter(self.nodes)

    @property
    def key_file(self) -> Path:
        """The swarm key every node is given (the first node's, made at its first mount)."""
        assert self.nodes, "no node yet"
        return self.nodes[0].data_dir / "swarm.key"

    def new_node(self, name: str) -> SwarmNode:
        """Make the object for a new node; a subclass may return its own kind of node."""
        return SwarmNode(self, name, free_port())

    def add(
        self,
        name: str | None = None,
        *,
        bootstrap: SwarmNode | list[SwarmNode] | None = None,
        key_file: Path | None = None,
        replicas: int | str | None = None,
    ) -> SwarmNode:
        """A new node (not started): by default bootstrapped from the first, with its key."""
        node = self.new_node(name or "abcdefghijklmnopqrstuvwxyz"[len(self.nodes)])
        if self.nodes:
            node.swarm_key_file = key_file or self.key_file
            sources = [self.nodes[0]] if bootstrap is None else bootstrap
            sources = sources if isinstance(sources, list) else [sources]
            node.bootstrap = [s.address for s in sources]
        else:
            node.swarm_key_file = key_file
        node.replicas = None if replicas is None else str(replicas)
        self.nodes.append(node)
        return node

    def start(self, n: int, *, replicas: int | str | None = None) -> list[SwarmNode]:
        """Add and start ``n`` nodes bootstrapped from the first; wait for a full mesh."""
        new = [self.add(replicas=replicas) for _ in range(n)]
        for node in new:
            node.start()
        self.wait_connected()
        return new

    def eventually(self, predicate: Callable[[], T], timeout: float, what: str) -> T:
        return eventually(predicate, timeout, what)

    def wait_connected(
        self, nodes: list[SwarmNode] | None = None, timeout: float = CONNECT_TIMEOUT
    ) -> None:
        """Until each of ``nodes`` (default: the running ones) lists all the others connected."""
        group = nodes if nodes is not None else [n for n in self.nodes if n in self.running]
        ids = {n: n.node_id for n in group}

        def meshed() -> bool:
            for node in group:
                missing = {ids[o] for o in group if o is not node} - node.connected_peers()
                assert not missing, f"{node.name} is not connected to {sorted(missing)}"
            return True

        eventually(meshed, timeout, f"a full mesh of {[n.name for n in group]}")

    def close(self) -> list[str]:
        """Take every node down (real umount first); return unexpected log lines."""
        problems: list[str] = []
        for node in self.nodes:
            try:
                if node.pid is not None and process_alive(node.pid) and node.is_mounted():
                    node.umount()
            except AssertionError as exc:
                problems.append(f"{node.name}: umount failed: {exc}")
            finally:
                with contextlib.suppress(Exception):
                    node.cleanup()
            self.running.discard(node)
            problems += [f"{node.name}: {line}" for line in node.log_problems()]
        return problems


def require_fuse() -> None:
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(f"FUSE unavailable: {reason}")


@contextlib.contextmanager
def swarm_at(base: Path) -> Iterator[Swarm]:
    """A ``Swarm`` under ``base`` (skips where FUSE is absent); taken down on exit."""
    require_fuse()
    with Swarm(base) as swarm:
        yield swarm
