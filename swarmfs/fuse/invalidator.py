"""Kernel cache invalidation from one dedicated thread (DESIGN.md §3, §8).

``pyfuse3.invalidate_entry``/``invalidate_inode`` block the calling thread; on
the event loop, while a request for the same directory is in flight, they hang
the process. So the loop only enqueues, and this thread calls them. ENOENT
(the kernel no longer knows the entry) is normal. ``stop()`` must run before
``pyfuse3.close()``.
"""

from __future__ import annotations

import logging
import queue
import threading

import pyfuse3

log = logging.getLogger(__name__)

_STOP = object()


class Invalidator:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="fuse-invalidator", daemon=True)
        self._thread.start()

    def entry(self, parent_ino: int, name: bytes, deleted_ino: int | None) -> None:
        self._queue.put(("entry", parent_ino, name, deleted_ino or 0))

    def inode(self, ino: int, attr_only: bool) -> None:
        self._queue.put(("inode", ino, attr_only))

    def stop(self) -> None:
        """Finish what is queued and end the thread (blocking: call it from a worker thread).
        Safe to call twice."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                if item[0] == "entry":  # type: ignore[index]
                    _, parent, name, deleted = item  # type: ignore[misc]
                    pyfuse3.invalidate_entry(parent, name, deleted=deleted)
                else:
                    _, ino, attr_only = item  # type: ignore[misc]
                    pyfuse3.invalidate_inode(ino, attr_only=attr_only)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.debug("invalidation %r failed: %s", item, exc)
            except Exception:
                log.exception("invalidation %r failed", item)
