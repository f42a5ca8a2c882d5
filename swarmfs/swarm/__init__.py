"""The swarm: which nodes are members and connected (``membership``); later discovery, placement.

Role: turn addresses into authenticated connections and keep exactly one per
pair of nodes; higher layers (index sync, replication) register message
handlers and connect hooks here and ask for the connected peers.

May import: ``swarmfs.net`` (connections, messages), ``swarmfs.crypto``
(certificates, TLS contexts), ``swarmfs.errors``, trio. Known peers persist
through the ``PeerStore`` protocol that ``node.py`` fills with the SQLite
implementation from ``meta/``, so this package never imports ``meta``.

Concurrency: everything runs as tasks on the node's trio loop; state is only
touched from there, so no locks are needed beyond the connections' own.
"""
