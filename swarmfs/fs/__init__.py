"""File and namespace semantics, testable without a mount.

``namespace.Filesystem`` answers every operation in terms of inode numbers,
``bytes`` names and errno (``FsError``); ``fuse/`` only translates it for the
kernel. ``content`` reads and writes chunks (encrypting in worker threads);
``staging`` holds a file's uncommitted writes. Everything here runs on the trio
event loop; blocking work goes to worker threads. May import ``meta``,
``store`` and ``crypto``; never ``fuse``, ``net`` or ``swarm``.
"""
