"""Domain errors shared by every layer.

``UserError`` is a mistake of the person running a command: the CLI prints its
message as one line and exits 1, without a traceback. Everything else that
escapes is a bug and gets a traceback in the log.
"""


class SwarmfsError(Exception):
    """Base of every error swarmfs raises on purpose."""


class UserError(SwarmfsError):
    """A problem the user can fix; printed as one line, exit status 1."""


class CorruptChunk(SwarmfsError):
    """A chunk failed its id, tag or plaintext-hash check."""


class ChunkMissing(SwarmfsError):
    """A chunk is neither stored locally nor obtainable."""


class ProtocolError(SwarmfsError):
    """A peer sent something that breaks the wire protocol; the connection is closed."""
