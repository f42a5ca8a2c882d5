"""Records in the plain-map form carried by ``index`` and ``announce`` messages.

Everything from a peer is untrusted: ``record_from_map`` checks every field
(type, range, size) and every path (relative, no ``.``/``..``/empty
components, no NUL, valid UTF-8, names ≤ 255 bytes) before anything is
applied, raising ``InvalidRecord``. A block list longer than ``INLINE_BLOCKS``
travels in manifest chunks (encrypted and content-addressed like data; see
``pack_manifest``), so no record outgrows a frame whatever the file size.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

from swarmfs import CHUNK_SIZE
from swarmfs.errors import SwarmfsError
from swarmfs.meta.records import Block, Kind, Record, VersionVector

INLINE_BLOCKS = 1024
MAX_VERSION_ENTRIES = 4096
MAX_PATH = 4096
MAX_NAME = 255
MAX_SIZE = 1 << 50
NODE_ID_LEN = 26
_HASH = 32
_ENTRY = struct.Struct(">32s32sI")  # chunk id, plaintext hash, length; zero ids: a hole
MANIFEST_ENTRIES = CHUNK_SIZE // _ENTRY.size


class InvalidRecord(SwarmfsError):
    """A record from a peer that must not be applied."""


def check_path(path: bytes) -> None:
    if not isinstance(path, bytes) or not path or len(path) > MAX_PATH:
        raise InvalidRecord("path must be 1..4096 bytes")
    if b"\0" in path:
        raise InvalidRecord("path contains NUL")
    for part in path.split(b"/"):
        if part in (b"", b".", b".."):
            raise InvalidRecord(f"path {path[:80]!r} has an empty, '.' or '..' component")
        if len(part) > MAX_NAME:
            raise InvalidRecord("a path component is longer than 255 bytes")
    try:
        path.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRecord("path is not UTF-8") from None


def _block_to_list(b: Block) -> list[Any]:
    return [b.chunk_id, b.h, b.length]


def _block_from(v: object) -> Block:
    if not isinstance(v, list) or len(v) != 3:
        raise InvalidRecord("a block must be [chunk_id, h, length]")
    chunk_id, h, length = v
    if chunk_id is None and h is None:
        pass
    elif not (isinstance(chunk_id, bytes) and isinstance(h, bytes)):
        raise InvalidRecord("block ids must be bytes")
    elif len(chunk_id) != _HASH or len(h) != _HASH:
        raise InvalidRecord("block ids must be 32 bytes")
    if not isinstance(length, int) or isinstance(length, bool) or not 0 <= length <= CHUNK_SIZE:
        raise InvalidRecord("block length out of range")
    return Block(chunk_id, h, length)


def record_to_map(
    rec: Record, manifests: Sequence[tuple[bytes, bytes]] | None = None
) -> dict[str, Any]:
    """``manifests``: (chunk id, h) of manifest chunks standing in for a long block list."""
    m: dict[str, Any] = {
        "p": rec.path,
        "k": rec.kind.value,
        "m": rec.mode,
        "u": rec.uid,
        "g": rec.gid,
        "s": rec.size,
        "t": rec.mtime_ns,
        "v": rec.version.as_dict(),
        "by": rec.modified_by,
        "d": rec.deleted,
    }
    if rec.kind == Kind.SYMLINK:
        m["l"] = rec.target
    if manifests is not None:
        m["mf"] = [[c, h] for c, h in manifests]
        m["n"] = len(rec.blocks)
    elif rec.blocks:
        m["b"] = [_block_to_list(b) for b in rec.blocks]
    return m


def _int(m: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    v = m.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise InvalidRecord(f"field {key!r} missing or out of range")
    return v


def record_from_map(m: Mapping[str, Any]) -> tuple[Record, list[tuple[bytes, bytes]] | None]:
    """A validated record, and the manifest chunks to fetch if its block list is not inline."""
    if not isinstance(m, Mapping):
        raise InvalidRecord("a record must be a map")
    path = m.get("p")
    check_path(path)  # type: ignore[arg-type]
    try:
        kind = Kind(m.get("k"))
    except ValueError:
        raise InvalidRecord("unknown kind") from None
    version = m.get("v")
    if not isinstance(version, dict) or len(version) > MAX_VERSION_ENTRIES:
        raise InvalidRecord("version vector missing or too long")
    for node, n in version.items():
        if not isinstance(node, str) or len(node) != NODE_ID_LEN:
            raise InvalidRecord("version vector has a malformed node id")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n < 1 << 62:
            raise InvalidRecord("version counter out of range")
    by = m.get("by")
    if not isinstance(by, str) or len(by) != NODE_ID_LEN:
        raise InvalidRecord("modified_by malformed")
    deleted = m.get("d")
    if not isinstance(deleted, bool):
        raise InvalidRecord("deleted flag malformed")
    target = m.get("l", b"")
    if not isinstance(target, bytes) or len(target) > MAX_PATH or b"\0" in target:
        raise InvalidRecord("symlink target malformed")
    size = _int(m, "s", 0, MAX_SIZE)
    blocks: tuple[Block, ...] = ()
    manifests: list[tuple[bytes, bytes]] | None = None
    if "mf" in m:
        raw = m["mf"]
        if (
            not isinstance(raw, list)
            or not raw
            or len(raw) > MAX_SIZE // CHUNK_SIZE // MANIFEST_ENTRIES + 1
        ):
            raise InvalidRecord("manifest list malformed")
        manifests = []
        for entry in raw:
            b = _block_from([*entry, 0] if isinstance(entry, list) and len(entry) == 2 else None)
            manifests.append((b.chunk_id, b.h))  # type: ignore[arg-type]
        _int(m, "n", INLINE_BLOCKS + 1, MAX_SIZE // CHUNK_SIZE + 1)
    elif "b" in m:
        raw = m["b"]
        if not isinstance(raw, list) or len(raw) > INLINE_BLOCKS:
            raise InvalidRecord("block list malformed or too long")
        blocks = tuple(_block_from(b) for b in raw)
    if len(blocks) > -(-size // CHUNK_SIZE):
        raise InvalidRecord("more blocks than the size holds")
    if kind != Kind.FILE and (blocks or manifests):
        raise InvalidRecord("only files have blocks")
    rec = Record(
        path=path,  # type: ignore[arg-type]
        kind=kind,
        mode=_int(m, "m", 0, 0o7777),
        uid=_int(m, "u", 0, 2**32 - 1),
        gid=_int(m, "g", 0, 2**32 - 1),
        size=size,
        mtime_ns=_int(m, "t", -(2**62), 2**62),
        version=VersionVector.of(version),
        modified_by=by,
        deleted=deleted,
        target=target,
        blocks=blocks,
    )
    return rec, manifests


def pack_manifest(blocks: Sequence[Block]) -> bytes:
    zero = bytes(_HASH)
    return b"".join(_ENTRY.pack(b.chunk_id or zero, b.h or zero, b.length) for b in blocks)


def unpack_manifest(data: bytes) -> list[Block]:
    if len(data) % _ENTRY.size:
        raise InvalidRecord("manifest chunk has a partial entry")
    zero = bytes(_HASH)
    out = []
    for chunk_id, h, length in _ENTRY.iter_unpack(data):
        if length > CHUNK_SIZE:
            raise InvalidRecord("manifest block length out of range")
        out.append(Block(None, None, length) if chunk_id == zero else Block(chunk_id, h, length))
    return out
