"""Mounting: options, the FUSE session, and clearing a dead mount left by a crash."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pyfuse3

from swarmfs.errors import UserError

log = logging.getLogger(__name__)

FS_TYPE = "fuse.swarmfs"
ALLOWED_OPTIONS = frozenset(
    {"allow_other", "default_permissions", "ro", "noatime", "nosuid", "nodev"}
)


def fuse_options(data_dir: Path, user_options: Iterable[str]) -> set[str]:
    """The option set for ``pyfuse3.init``: fsname ``swarmfs:DIR``, type ``fuse.swarmfs``.

    ``default_permissions`` is always on, so the kernel enforces modes and the
    sticky bit for every user the mount is shared with.
    """
    opts = set(user_options)
    unknown = opts - ALLOWED_OPTIONS
    if unknown:
        raise UserError(f"unsupported mount option: {', '.join(sorted(unknown))}")
    return opts | {"default_permissions", f"fsname=swarmfs:{data_dir}", "subtype=swarmfs"}


def mount_type(mountpoint: Path) -> str | None:
    """The fstype of the mount at ``mountpoint`` from /proc/self/mountinfo, if mounted."""
    target = os.path.realpath(mountpoint)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) > 4 and _unescape(fields[4]) == target:
            found = right.split()[0]
    return found


def _unescape(field: str) -> str:
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def clear_dead_mount(mountpoint: Path) -> bool:
    """A swarmfs mount whose node died answers ENOTCONN: lazily unmount it. True if cleared."""
    try:
        os.stat(mountpoint)
        return False
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return False
    if mount_type(mountpoint) != FS_TYPE:
        return False
    subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False, capture_output=True)
    log.warning("cleared the dead swarmfs mount at %s left by a crashed node", mountpoint)
    return True


def init(ops: pyfuse3.Operations, mountpoint: Path, options: set[str]) -> None:
    try:
        pyfuse3.init(ops, str(mountpoint), options)
    except RuntimeError as exc:
        raise UserError(f"cannot mount {mountpoint}: {exc}") from None


async def serve(max_tasks: int) -> None:
    await pyfuse3.main(min_tasks=2, max_tasks=max_tasks)


def terminate() -> None:
    pyfuse3.terminate()


def close(unmount: bool = True) -> None:
    pyfuse3.close(unmount=unmount)
