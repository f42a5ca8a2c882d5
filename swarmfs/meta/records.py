"""The replicated unit: one record per path (DESIGN.md §3).

Paths are ``bytes``, relative to the swarm root, components joined by ``/``,
the root itself is ``b""``. Names are byte-exact (no normalisation). Records are
immutable values; the database and the wire both convert to and from them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


class Kind(enum.StrEnum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    FIFO = "fifo"
    SOCKET = "socket"


class Order(enum.Enum):
    """How two version vectors relate."""

    EQUAL = "equal"
    BEFORE = "before"  # a < b: b dominates
    AFTER = "after"  # a > b: a dominates
    CONCURRENT = "concurrent"


@dataclass(frozen=True)
class VersionVector:
    """``{node_id: counter}``; zero counters are never stored, so equal vectors compare equal."""

    counters: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, mapping: Mapping[str, int] | Iterable[tuple[str, int]]) -> VersionVector:
        items = mapping.items() if isinstance(mapping, Mapping) else mapping
        return cls(tuple(sorted((node, n) for node, n in items if n > 0)))

    def as_dict(self) -> dict[str, int]:
        return dict(self.counters)

    def get(self, node: str) -> int:
        for name, n in self.counters:
            if name == node:
                return n
        return 0

    def bump(self, node: str) -> VersionVector:
        d = self.as_dict()
        d[node] = d.get(node, 0) + 1
        return VersionVector.of(d)

    def merge(self, other: VersionVector) -> VersionVector:
        """Pointwise maximum."""
        d = self.as_dict()
        for node, n in other.counters:
            if n > d.get(node, 0):
                d[node] = n
        return VersionVector.of(d)

    def compare(self, other: VersionVector) -> Order:
        a, b = self.as_dict(), other.as_dict()
        less = greater = False
        for node in a.keys() | b.keys():
            x, y = a.get(node, 0), b.get(node, 0)
            if x < y:
                less = True
            elif x > y:
                greater = True
        if less and greater:
            return Order.CONCURRENT
        if less:
            return Order.BEFORE
        if greater:
            return Order.AFTER
        return Order.EQUAL


@dataclass(frozen=True)
class Block:
    """One chunk of a file: ``chunk_id`` None is a hole (reads as zeros).

    ``length`` is the plaintext length stored; the rest of the chunk's logical
    extent (up to ``CHUNK_SIZE`` or the file's end) reads as zeros.
    """

    chunk_id: bytes | None
    h: bytes | None
    length: int


@dataclass(frozen=True)
class Record:
    path: bytes
    kind: Kind
    mode: int  # permission bits only (07777); the kind gives the file type
    uid: int
    gid: int
    size: int
    mtime_ns: int
    version: VersionVector
    modified_by: str
    deleted: bool = False
    target: bytes = b""  # symlink target
    blocks: tuple[Block, ...] = field(default=(), compare=True)

    @property
    def name(self) -> bytes:
        return self.path.rsplit(b"/", 1)[-1]

    @property
    def parent(self) -> bytes:
        return parent_of(self.path)


def parent_of(path: bytes) -> bytes:
    return path.rsplit(b"/", 1)[0] if b"/" in path else b""


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name
