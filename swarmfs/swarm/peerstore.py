"""Known peers kept in the node's SQLite database, so a restart redials them."""

from __future__ import annotations

from swarmfs.meta.db import Database
from swarmfs.swarm.membership import KnownPeer


class SqlitePeerStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def load(self) -> list[KnownPeer]:
        return [KnownPeer(n, a, t) for n, a, t in self.db.reader.known_peers()]

    async def save(self, peer: KnownPeer) -> None:
        await self.db.write(lambda t: t.save_peer(peer.node_id, peer.address, peer.last_seen))
