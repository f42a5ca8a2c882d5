"""Mounting: the option set and the FUSE session (a dead mount is cleared by ``cli``)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pyfuse3

from swarmfs.config import FUSE_OPTIONS
from swarmfs.errors import UserError


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


async def serve(max_tasks: int) -> None:
    await pyfuse3.main(min_tasks=2, max_tasks=max_tasks)


def terminate() -> None:
    pyfuse3.terminate()


def close(unmount: bool = True) -> None:
    pyfuse3.close(unmount=unmount)
