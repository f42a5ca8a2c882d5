"""Review fixes outside the network and store tests' own subjects.

``_mount_device`` runs right after the mount, on the event loop: a mountinfo it
cannot read must cost the read-ahead tweak, not the node. The test gives a real
process a ``/proc`` without mountinfo (a tmpfs over it in a private mount
namespace), so it needs root and ``unshare``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

_PROBE = """
import logging, sys
from pathlib import Path
from swarmfs.fuse.mount import _mount_device, raise_readahead
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(message)s")
assert not Path("/proc/self/mountinfo").exists()
assert _mount_device(Path("/")) is None
raise_readahead(Path("/"))
print("survived")
"""


def test_an_unreadable_mountinfo_leaves_read_ahead_alone() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private /proc")
    script = 'mount -t tmpfs tmpfs /proc && exec "$0" -c "$1"'
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, sys.executable, _PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "mount:" in result.stderr and "survived" not in result.stdout:
        pytest.skip(f"cannot hide /proc here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert "cannot read /proc/self/mountinfo" in result.stdout
    assert result.stdout.rstrip().endswith("survived")
