"""Namespace metadata: records, version vectors, merge rules and the SQLite database.

May import ``swarmfs.crypto`` types only; never ``store``, ``fs``, ``fuse`` or ``net``.
``records`` and ``merge`` are pure (no I/O). ``db`` owns every SQLite
connection: reads run on the caller's thread, writes on one writer thread.
"""
