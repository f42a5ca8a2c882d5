"""Listen ports for test nodes that no other node or connection of this run can take.

Binding to port 0 and releasing the socket hands out a port from the kernel's
ephemeral range. Until the node binds it, the same port can be handed out
again, or taken as the local end of some node's outgoing connection; a node
then fails with "listen address already in use". Ports here come from below
the ephemeral range and are never handed out twice in one test run.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback TCP port nobody listens on, outside the ephemeral range, not given before."""
    low = _ephemeral_low()
    candidates = range(max(1024, low - 12000), low)
    for _ in range(1000):
        port = random.choice(candidates)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")
