"""``swarmfs demo``: three real nodes walked through write, read and delete, then taken down."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from mounted import fuse_unavailable, mount_entry, process_alive, wait_until
from test_ux import SWARMFS

DEMO_TIMEOUT = 120.0

pytestmark = pytest.mark.mounted


@pytest.fixture(autouse=True)
def _fuse() -> None:
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(f"FUSE unavailable: {reason}")


def demo_dir(output: str) -> Path:
    match = re.search(r"everything in (\S+)", output)
    assert match, output
    return Path(match[1])


def assert_torn_down(base: Path) -> None:
    assert not base.exists(), f"{base} was left behind"
    for number in (1, 2, 3):
        assert mount_entry(base / f"mnt{number}") is None


def test_demo_exit_runs_to_completion() -> None:
    result = subprocess.run(
        [SWARMFS, "demo", "--exit"],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result
    out = result.stdout
    for step in (
        "node 1 is up: listening on 127.0.0.1:",
        "node 3 is up: joined through node 1",
        "the swarm is connected",
        "node 1 wrote mnt1/hello.txt",
        "node 3 reads it after",
        "node 2 deleted mnt2/hello.txt",
        "hello.txt is gone on all three nodes",
        "the swarm is down",
    ):
        assert step in out, out
    assert out.count("2 peers") == 3, out  # each node's status
    assert_torn_down(demo_dir(out))


def test_demo_stays_up_until_interrupted(tmp_path: Path) -> None:
    log = tmp_path / "demo.out"
    with log.open("w") as out:
        demo = subprocess.Popen([SWARMFS, "demo"], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(
            lambda: "stays up until Ctrl-C" in log.read_text() or demo.poll() is not None,
            DEMO_TIMEOUT,
            "the demo to finish its walk-through",
        )
        assert demo.poll() is None, log.read_text()
        base = demo_dir(log.read_text())
        assert all(mount_entry(base / f"mnt{n}") is not None for n in (1, 2, 3))
        (base / "mnt1" / "late").write_bytes(b"written while the demo waits")
        wait_until(
            lambda: (base / "mnt3" / "late").exists(), DEMO_TIMEOUT, "the late file on node 3"
        )
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=DEMO_TIMEOUT) == 0, log.read_text()
        assert_torn_down(base)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        _force_down(log.read_text())


def _force_down(output: str) -> None:
    """Whatever a failed test left: unmount lazily, kill the nodes by their pid files."""
    match = re.search(r"everything in (\S+)", output)
    if match is None:
        return
    base = Path(match[1])
    for number in (1, 2, 3):
        if mount_entry(base / f"mnt{number}") is not None:
            subprocess.run(["fusermount3", "-uz", base / f"mnt{number}"], check=False)
        try:
            pid = int((base / f"node{number}" / "swarmfs.pid").read_text())
        except (OSError, ValueError):
            continue
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)
