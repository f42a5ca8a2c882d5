"""Logging for the ``swarmfs`` process: stderr in the foreground, a rotated file otherwise.

A detached node writes ``DIR/swarmfs.log`` through a size-bounded rotating
handler, so a node that runs for months never fills the disk with its log.
Call once per process, before trio starts.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 3


def level_for(verbose: bool, quiet: bool, configured: int = logging.INFO) -> int:
    """``-v`` means DEBUG, ``-q`` WARNING; otherwise the configured level."""
    if verbose:
        return logging.DEBUG
    if quiet:
        return logging.WARNING
    return configured


def setup_logging(level: int, log_file: Path | None = None) -> None:
    """Send every logger's records to stderr, or to ``log_file`` rotated at 10 MiB × 3."""
    handler: logging.Handler
    if log_file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8"
        )
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
