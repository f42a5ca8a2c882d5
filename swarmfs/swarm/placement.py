"""Where a chunk's replicas go: rendezvous (highest random weight) hashing.

Every node ranks the same peers in the same order for a chunk, without
coordination, and adding or removing a peer moves only the chunks it ranks first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def rank(chunk_id: bytes, node_ids: Iterable[str]) -> list[str]:
    """Node ids in rendezvous order for ``chunk_id`` (best first)."""
    return sorted(
        node_ids, key=lambda n: hashlib.sha256(chunk_id + n.encode()).digest(), reverse=True
    )
