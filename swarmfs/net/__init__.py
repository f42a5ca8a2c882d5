"""Peer transport: frames and typed messages (``wire``), one connection (``peer``).

Role: move validated messages between two authenticated nodes. ``wire`` is pure
(no I/O): the frame splitter, the msgpack codec with its caps and the message
dataclasses (the one place msgpack is used). ``peer`` drives one
``trio`` stream (TLS over TCP, set up by ``swarm.membership``): many requests
in flight, pushes, request dispatch to a handler table, keepalive.

May import: ``swarmfs`` (``CHUNK_SIZE``), ``swarmfs.errors``, trio, msgpack. Not
``crypto`` (TLS contexts are handed in as streams), ``meta``, ``store`` or
``swarm``: higher layers register handlers instead.

Concurrency: everything runs on the trio loop. A ``PeerConnection`` has one
reader task and a send lock; its public methods may be called from any number
of tasks at once. Push handlers run in order on the reader task; request
handlers run in their own tasks, at most ``MAX_IN_FLIGHT`` per connection.
"""
