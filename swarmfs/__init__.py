"""swarmfs: a peer-to-peer, end-to-end encrypted, replicated filesystem mounted with FUSE.

Layers, in the order data flows (DESIGN.md §2): ``fuse`` (kernel boundary) →
``fs`` (file semantics) → ``meta`` (records, SQLite) and ``store`` (chunks) →
``crypto`` → ``node`` (composition root) → ``net``/``swarm`` (peers).
"""

__version__ = "0.1.0"

CHUNK_SIZE = 1024 * 1024
"""Plaintext size of every chunk but a file's last one."""

SMALL_CHUNK = 64 * 1024
"""Chunks up to this size (small files, tails) are read, verified and written on the
event loop: ~20 µs of work, against ~60 µs for the two thread switches around it."""
