"""Mounting: the option set and the FUSE session (a dead mount is cleared by ``cli``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import pyfuse3

from swarmfs.config import FUSE_OPTIONS
from swarmfs.errors import UserError

log = logging.getLogger(__name__)

READ_AHEAD_KIB = 1024  # one chunk


def fuse_options(data_dir: Path, user_options: Iterable[str]) -> set[str]:
    """The option set for ``pyfuse3.init``: fsname ``swarmfs:DIR``, type ``fuse.swarmfs``.

    ``default_permissions`` is always on, so the kernel enforces modes and the
    sticky bit for every user the mount is shared with.
    """
    opts = set(user_options)
    unknown = opts - FUSE_OPTIONS  # config refuses these first; this guards other callers
    if unknown:
        raise UserError(f"unsupported mount option: {', '.join(sorted(unknown))}")
    # libfuse splits options at commas and unescapes "\\," and "\\\\"
    fsname = str(data_dir).replace("\\", "\\\\").replace(",", "\\,")
    return opts | {"default_permissions", f"fsname=swarmfs:{fsname}", "subtype=swarmfs"}


def init(ops: pyfuse3.Operations, mountpoint: Path, options: set[str]) -> None:
    try:
        pyfuse3.init(ops, str(mountpoint), options)
    except RuntimeError as exc:
        raise UserError(f"cannot mount {mountpoint}: {exc}") from None


def raise_readahead(mountpoint: Path, kib: int = READ_AHEAD_KIB) -> None:
    """Let the kernel read ahead a whole chunk (it defaults to 128 KiB for FUSE).

    Sequential reads then arrive as 1 MiB requests with the next ones already
    under way, instead of one 128 KiB request at a time: a cold ``dd`` of 1 GiB
    went from ~400 to ~950 MB/s here. Needs root (sysfs); otherwise reads keep
    the default, which is only slower. Call it once the mount answers: the
    kernel sets read-ahead anew from the reply to FUSE's INIT request.
    """
    device = _mount_device(mountpoint)
    if device is None:
        log.debug("no mountinfo line for %s: read-ahead left as it is", mountpoint)
        return
    try:
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(f"{kib}\n")
    except OSError as exc:
        log.debug("read-ahead of %s left at the kernel's default: %s", mountpoint, exc)


def _mount_device(mountpoint: Path) -> str | None:
    """``major:minor`` of the last mount at ``mountpoint``, from /proc/self/mountinfo.

    ``None`` if there is none or mountinfo cannot be read (read-ahead is only speed).
    """
    # abspath, not realpath: realpath would lstat the mount's root, a FUSE request
    # that this very thread (the event loop's) must answer, so it would hang. The
    # CLI hands in a realpath taken before mounting, so the two spellings agree.
    # mountinfo escapes backslash, space, tab and newline in paths as octal.
    escaped = os.path.abspath(mountpoint)
    for char in "\\ \t\n":
        escaped = escaped.replace(char, f"\\{ord(char):03o}")
    device = None
    try:
        with open("/proc/self/mountinfo") as mountinfo:
            for line in mountinfo:
                fields = line.split(" ")
                if len(fields) > 4 and fields[4] == escaped:
                    device = fields[2]
    except OSError as exc:
        log.debug("cannot read /proc/self/mountinfo: %s", exc)
        return None
    return device


async def serve(max_tasks: int) -> None:
    await pyfuse3.main(min_tasks=2, max_tasks=max_tasks)


def terminate() -> None:
    pyfuse3.terminate()


def close(unmount: bool = True) -> None:
    pyfuse3.close(unmount=unmount)
