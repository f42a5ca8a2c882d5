"""Network faults between real nodes in network namespaces (DESIGN.md §6, §7).

Three nodes, each in a namespace of its own behind a hub namespace
(tests/netns.py), started with ``nsenter --net=... swarmfs mount`` so their
mounts are visible here. Links are cut with ``ip link set down``, packets
dropped with nftables ``numgen random``, bandwidth limited with ``tc tbf``,
and latency added by a transparent delaying TCP relay. Namespaces, tables,
qdiscs and the relay are removed however a test ends.

CI sizes: 10 MB over 1 % loss and 50 ms added each way. The full run
(``contrib/faults/run-full.sh``, ``SWARMFS_FAULTS_FULL=1``): 100 MB, 5 %, 100 ms.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultkit import FULL, MiB, assert_sound, digest, payload, wait_backlog_empty
from netns import FaultSwarm, Lab, netns_swarm, tools_missing
from swarm_harness import eventually, require_fuse, tree_digests

pytestmark = [pytest.mark.mounted, pytest.mark.slow]

CONVERGE = 120.0 if FULL else 60.0


@pytest.fixture
def lab_swarm(tmp_path: Path) -> Iterator[tuple[Lab, FaultSwarm]]:
    require_fuse()
    reason = tools_missing()
    if reason is not None:
        pytest.skip(reason)
    with netns_swarm(tmp_path, 3) as pair:
        yield pair


def _identical(nodes, timeout: float = CONVERGE) -> dict[str, tuple[str, ...]]:  # type: ignore[no-untyped-def]
    """Until every node shows the same tree (names, sizes, sha256); returns it."""

    def same() -> dict[str, tuple[str, ...]]:
        trees = [tree_digests(n.mnt) for n in nodes]
        for node, tree in zip(nodes[1:], trees[1:], strict=True):
            assert tree == trees[0], f"{node.name} differs from {nodes[0].name}: " + ", ".join(
                sorted(set(tree.items()) ^ set(trees[0].items()), key=str)[:6].__repr__()
            )
        return trees[0]

    return eventually(same, timeout, "every node to show the same tree")


class Reader(threading.Thread):
    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True, name=f"reader {path}")
        self.path = path
        self.data: bytes | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.data = self.path.read_bytes()
        except BaseException as exc:
            self.error = exc


def test_link_cut_mid_transfer_completes_after_restore(
    lab_swarm: tuple[Lab, FaultSwarm],
) -> None:
    lab, swarm = lab_swarm
    a, b, c = swarm.start(3, replicas="all")
    lab.rate("40mbit")  # ~5 MB/s towards each node, so the transfer visibly takes a while
    data = payload(20 * MiB, 41)
    (a.mnt / "big.bin").write_bytes(data)
    # close-to-open: c opens the file once the committed version's record has arrived
    eventually(lambda: (c.mnt / "big.bin").stat().st_size == len(data), 30, "the record on c")
    reader = Reader(c.mnt / "big.bin")
    reader.start()  # c reads while its copy is still arriving

    def b_has_some() -> bool:
        assert b.status()["bytes_stored"] >= 3 * MiB
        return True

    eventually(b_has_some, 60, "the push to b to be under way")
    assert a.status()["backlog"]["chunks"] > 0, "the transfer was over before the cut"
    lab.link(1, up=False)  # b cut off mid-transfer
    lab.link(2, up=False)  # and c, with its read in progress
    cut_at = time.monotonic()
    eventually(lambda: time.monotonic() - cut_at > 3, 10, "3 s of outage")  # the fault's length
    lab.link(1)
    lab.link(2)
    reader.join(CONVERGE)
    assert not reader.is_alive(), "the read on c never finished"
    assert reader.error is None, f"read on c failed: {reader.error!r}"
    assert reader.data is not None and digest(reader.data) == digest(data), "c read wrong data"
    tree = _identical([a, b, c])
    assert tree["big.bin"][2] == digest(data)
    wait_backlog_empty(a, CONVERGE)
    for node in (a, b, c):
        assert_sound(node, after_restart=False)


def test_partition_two_one_then_heal_converges(lab_swarm: tuple[Lab, FaultSwarm]) -> None:
    lab, swarm = lab_swarm
    a, b, c = swarm.start(3)
    for name in ("shared.txt", "gone-a.txt", "gone-c.txt", "edit-vs-delete.txt"):
        (a.mnt / name).write_bytes(f"original {name}\n".encode())
    _identical([a, b, c])

    lab.link(2, up=False)  # {a, b} | {c}
    # side {a, b}
    (a.mnt / "shared.txt").write_bytes(b"edited on a\n")
    (a.mnt / "gone-a.txt").unlink()
    (a.mnt / "edit-vs-delete.txt").unlink()
    (b.mnt / "new-b.bin").write_bytes(payload(2 * MiB, 51))
    # side {c}
    (c.mnt / "shared.txt").write_bytes(b"edited on c, later\n")
    (c.mnt / "gone-c.txt").unlink()
    (c.mnt / "edit-vs-delete.txt").write_bytes(b"edited on c\n")
    (c.mnt / "new-c.bin").write_bytes(payload(MiB + 3, 52))
    # each side converges within itself while the other is away
    eventually(lambda: (b.mnt / "shared.txt").read_bytes() == b"edited on a\n", 30, "a->b")
    assert (c.mnt / "gone-a.txt").exists(), "the partition leaked"

    lab.link(2)
    tree = _identical([a, b, c])
    names = set(tree)
    assert "gone-a.txt" not in names and "gone-c.txt" not in names, "a deleted file came back"
    assert (a.mnt / "edit-vs-delete.txt").read_bytes() == b"edited on c\n", "the edit must win"
    assert {"new-b.bin", "new-c.bin", "shared.txt"} <= names
    conflicts = sorted(n for n in names if n.startswith("shared.sync-conflict-"))
    assert len(conflicts) == 1, f"expected one conflict copy, got {sorted(names)}"
    versions = {(a.mnt / "shared.txt").read_bytes(), (a.mnt / conflicts[0]).read_bytes()}
    assert versions == {b"edited on a\n", b"edited on c, later\n"}, "a version was lost"
    assert (a.mnt / "shared.txt").read_bytes() == b"edited on c, later\n", "later mtime wins"
    for node in (a, b, c):
        assert_sound(node, after_restart=False)


def test_loss_and_delay_still_replicate(lab_swarm: tuple[Lab, FaultSwarm]) -> None:
    lab, swarm = lab_swarm
    size, loss, delay = (100 * MiB, 5, 0.100) if FULL else (10 * MiB, 1, 0.050)
    relay = lab.delay(delay)
    lab.loss(loss)
    a, b, c = swarm.start(3)
    for node in (a, b, c):
        node.expect_log(r"sent an invalid record")  # checked below, as its own failure
        # lossy links cut some handshakes (the relay drops both ends); membership redials
        node.expect_log(r"handshake failed: it hung up during the")
    assert relay.connections >= 3, "the links do not go through the delaying relay"

    def rtt_to_both() -> list[float]:
        peers = [p for p in a.status()["peers"] if p["connected"]]
        rtts = [p["rtt_ms"] for p in peers if p["rtt_ms"] is not None]
        assert len(rtts) == 2, f"a measured the rtt of {len(rtts)} of 2 peers: {peers}"
        return rtts

    rtts = eventually(rtt_to_both, 30, "a to measure the rtt to b and c")  # never empty
    data = payload(size, 61)
    started = time.monotonic()
    (a.mnt / "big.bin").write_bytes(data)
    (b.mnt / "small-b.txt").write_bytes(b"from b\n")
    (c.mnt / "dir-c").mkdir()
    (c.mnt / "dir-c" / "small-c.txt").write_bytes(b"from c\n")
    tree = _identical([a, b, c])
    took = time.monotonic() - started
    assert tree["big.bin"][2] == digest(data)
    wait_backlog_empty(a, CONVERGE)
    print(
        f"{size // MiB} MiB over {loss} % loss and {delay * 1000:g} ms each way: identical on"
        f" 3 nodes after {took:.1f} s; rtt {rtts} ms; relay carried {relay.bytes / MiB:.1f} MiB"
        f" on {relay.connections} connections"
    )
    assert all(r >= 2 * delay * 1000 * 0.9 for r in rtts), f"rtt {rtts} below the added delay"
    for node in (a, b, c):
        assert_sound(node, after_restart=False)
    rejected = [ln for n in (a, b, c) for ln in n.log_text().splitlines() if "invalid record" in ln]
    assert not rejected, f"{len(rejected)} records sent were rejected: {rejected[:3]}"
