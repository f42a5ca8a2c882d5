"""Frames and messages of the peer protocol (DESIGN.md §5), without any I/O.

A frame is a 4-byte big-endian length followed by one msgpack map holding at
least ``t`` (the message type) and, for requests and their replies, ``id``.
Everything a peer sends is untrusted: the length is checked before a byte of
the body is buffered, the msgpack decoder caps every string, byte string,
array and map, only whitelisted types become messages, and every field is
type- and range-checked before a message object exists. Anything else is a
``ProtocolError``, which closes that one connection.

Each message type is a frozen dataclass with ``to_wire()`` and
``from_wire()``. A map whose ``t`` is well-formed but unknown becomes an
``UnknownRequest`` so the receiver can answer it with an ``error`` instead of
dropping the connection (a newer peer may speak more types). Unknown keys in a
known message are ignored for the same reason. To add a message type, write
its dataclass and add it to ``MESSAGE_TYPES``.

``hello`` opens every connection in both directions and may be sent again
later to update what it carries (listen address, known peers, index position).

Pure functions and per-connection objects; nothing here is shared.
"""

from __future__ import annotations

import ipaddress
import math
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from swarmfs import CHUNK_SIZE
from swarmfs.errors import ProtocolError

PROTOCOL_VERSION = 2  # 2: announce carries "after"
HEADER_SIZE = 4
MAX_FRAME = CHUNK_SIZE + 64 * 1024
"""Largest frame body accepted or sent: one chunk plus room for its envelope."""

MAX_CHUNK_DATA = CHUNK_SIZE + 1024
"""A stored chunk is its plaintext plus a format byte and an AEAD tag; leave headroom."""

CHUNK_ID_SIZE = 32
NODE_ID_LEN = 26
_BASE32_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz234567")
MAX_ADDRESS_LEN = 300
MAX_PEERS_IN_HELLO = 256
MAX_RECORDS = 10_000
MAX_TEXT = 1024
MAX_DEPTH = 16
"""Nesting allowed inside opaque record payloads."""

_U64 = 2**64 - 1
_I63 = 2**63 - 1

# Caps for the msgpack decoder. No container can legitimately hold more items
# than a frame has bytes, so none of these lets a tiny frame allocate much.
_UNPACK_LIMITS: dict[str, int] = {
    "max_bin_len": MAX_FRAME,
    "max_str_len": 64 * 1024,
    "max_array_len": MAX_FRAME,
    "max_map_len": MAX_FRAME // 2,
    "max_ext_len": 0,  # no extension types (timestamps included) are part of the protocol
}


# ---------------------------------------------------------------------------
# Frames


def encode_frame(msg: Message) -> bytes:
    """Serialise one message as a length-prefixed frame."""
    header, body = encode_frame_parts(msg)
    return header + body


def encode_frame_parts(msg: Message) -> tuple[bytes, bytes]:
    """The frame as (length header, body), so a large body is sent without joining a copy."""
    body = msgpack.packb(msg.to_wire(), use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ValueError(f"{msg.TYPE} message of {len(body)} bytes exceeds the frame limit")
    return len(body).to_bytes(HEADER_SIZE, "big"), body


class FrameDecoder:
    """Sans-I/O splitter: feed received bytes, take complete frame bodies back.

    ``feed`` splits the bytes at once and keeps everything in the decoder: the
    frames it completed, until they are taken, and the frame still in progress.
    So a caller that stops taking frames (``exchange_hello`` after the hello)
    loses nothing; the next ``feed`` or ``next_frame`` returns the rest in
    order. A completed frame is kept as the pieces it arrived in and joined
    only when taken (one copy per frame, made one frame at a time).

    A length above ``MAX_FRAME`` is refused as soon as its header is seen, so
    an oversized frame is never buffered: the frames before it are still
    returned, then taking the next one raises ``ProtocolError``, and keeps
    raising it (the connection is closed). ``pending`` tells the reader how
    large the body being received is, so it can reserve memory for it before
    reading on.
    """

    def __init__(self) -> None:
        self._head = bytearray()  # a header not yet complete
        self._length: int | None = None  # body length of the frame in progress
        self._parts: list[memoryview] = []  # what has arrived of its body
        self._have = 0
        self._ready: deque[list[memoryview]] = deque()  # complete frames not yet taken
        self._error: ProtocolError | None = None  # raised once the frames before it are taken

    @property
    def pending(self) -> int:
        """Body length of the frame whose header has arrived but whose body has not, or 0."""
        return self._length or 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Add ``data`` now; return an iterator that takes each complete frame body, in order.

        The iterator takes frames from the decoder (those left from before
        first); frames not taken stay for the next call.
        """
        self._split(data)
        return self.frames()

    def frames(self) -> Iterator[bytes]:
        """Take the complete frame bodies, in order, until none is left."""
        while (body := self.next_frame()) is not None:
            yield body

    def next_frame(self) -> bytes | None:
        """Take the next complete frame body, or ``None`` until more data is fed."""
        if self._ready:
            parts = self._ready.popleft()
            return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)
        if self._error is not None:
            raise self._error
        return None

    def _split(self, data: bytes) -> None:
        if self._error is not None:
            return  # nothing after a refused header is ever a frame
        view = memoryview(data)
        pos, end = 0, len(view)
        while True:
            if self._length is None:
                if pos == end:
                    return
                want = HEADER_SIZE - len(self._head)
                self._head += view[pos : pos + want]
                pos = min(end, pos + want)
                if len(self._head) < HEADER_SIZE:
                    return
                length = int.from_bytes(self._head, "big")
                self._head.clear()
                if length > MAX_FRAME:
                    self._error = ProtocolError(
                        f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit"
                    )
                    return
                self._length = length
            take = min(end - pos, self._length - self._have)
            if take:
                self._parts.append(view[pos : pos + take])
                self._have += take
                pos += take
            if self._have < self._length:
                return
            self._ready.append(self._parts)
            self._parts, self._have, self._length = [], 0, None


def decode_message(body: bytes) -> Message:
    """Decode and validate one frame body; ``ProtocolError`` for anything malformed."""
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            **_UNPACK_LIMITS,
        )
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        # ExtraData, FormatError, StackError, UnicodeDecodeError and limit
        # violations all land here; the message names the cause for the log.
        raise ProtocolError(f"undecodable frame ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("frame is not a map")
    kind = obj.get("t")
    if not isinstance(kind, str):
        raise ProtocolError("frame has no message type")
    cls = MESSAGE_TYPES.get(kind, UnknownRequest)
    return cls.from_wire(obj)


def decode_frames(decoder: FrameDecoder, data: bytes) -> Iterator[Message]:
    """Feed ``data`` now; the iterator decodes each complete frame as it takes it."""
    return map(decode_message, decoder.feed(data))


# ---------------------------------------------------------------------------
# Addresses: "host:port", IPv6 hosts in brackets


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """Split ``host:port``; ``ValueError`` with a readable message if malformed.

    Port 0 ("any free port") makes sense only for a listen address.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 host in brackets, [{host}]:{port_text}")
    port = int(port_text)
    if not (0 if allow_port_zero else 1) <= port < 65536:
        raise ValueError(f"{text!r}: port out of range")
    return host, port


def is_unspecified(host: str) -> bool:
    """``0.0.0.0`` or ``::``: a listen host that tells a peer nothing about where to dial."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


# ---------------------------------------------------------------------------
# Field validation


def _field(m: Mapping[str, Any], key: str) -> Any:
    try:
        return m[key]
    except KeyError:
        raise ProtocolError(f"{m.get('t')}: missing field {key!r}") from None


def _int(m: Mapping[str, Any], key: str, hi: int = _I63) -> int:
    v = _field(m, key)
    if type(v) is not int or not 0 <= v <= hi:
        raise ProtocolError(f"{m.get('t')}: {key!r} must be an integer in 0..{hi}")
    return v


def _req_id(m: Mapping[str, Any]) -> int:
    return _int(m, "id")


def _bool(m: Mapping[str, Any], key: str) -> bool:
    v = _field(m, key)
    if type(v) is not bool:
        raise ProtocolError(f"{m.get('t')}: {key!r} must be a boolean")
    return v


def _bytes(m: Mapping[str, Any], key: str, max_len: int, exact: bool = False) -> bytes:
    v = _field(m, key)
    if not isinstance(v, bytes) or len(v) > max_len or (exact and len(v) != max_len):
        want = f"exactly {max_len}" if exact else f"at most {max_len}"
        raise ProtocolError(f"{m.get('t')}: {key!r} must be {want} bytes")
    return v


def _str(m: Mapping[str, Any], key: str, max_len: int) -> str:
    v = _field(m, key)
    if not isinstance(v, str) or len(v) > max_len:
        raise ProtocolError(f"{m.get('t')}: {key!r} must be a string of at most {max_len}")
    return v


def _opt_address(m: Mapping[str, Any], key: str) -> str | None:
    v = _field(m, key)
    if v is None:
        return None
    return _check_address(m, key, v)


def _check_address(m: Mapping[str, Any], key: str, v: object) -> str:
    if not isinstance(v, str) or len(v) > MAX_ADDRESS_LEN:
        raise ProtocolError(f"{m.get('t')}: {key!r} must be a HOST:PORT string")
    try:
        parse_address(v)
    except ValueError as exc:
        raise ProtocolError(f"{m.get('t')}: {key!r}: {exc}") from None
    return v


def _peer_list(m: Mapping[str, Any], key: str) -> tuple[tuple[str, str], ...]:
    v = _field(m, key)
    if not isinstance(v, list) or len(v) > MAX_PEERS_IN_HELLO:
        raise ProtocolError(f"{m.get('t')}: {key!r} must be a list of at most {MAX_PEERS_IN_HELLO}")
    out = []
    for entry in v:
        if not (isinstance(entry, list) and len(entry) == 2 and _is_node_id(entry[0])):
            raise ProtocolError(f"{m.get('t')}: {key!r} entries must be [node id, address]")
        out.append((entry[0], _check_address(m, key, entry[1])))
    return tuple(out)


def _is_node_id(v: object) -> bool:
    return isinstance(v, str) and len(v) == NODE_ID_LEN and set(v) <= _BASE32_LOWER


def _records(m: Mapping[str, Any], key: str) -> tuple[dict[str, Any], ...]:
    """Opaque record maps, checked only for shape; ``meta/`` validates their fields."""
    v = _field(m, key)
    if not isinstance(v, list) or len(v) > MAX_RECORDS:
        raise ProtocolError(f"{m.get('t')}: {key!r} must be a list of at most {MAX_RECORDS}")
    for rec in v:
        if not isinstance(rec, dict):
            raise ProtocolError(f"{m.get('t')}: {key!r} entries must be maps")
        _check_plain(rec, m.get("t"), 0)
    return tuple(v)


def _check_plain(value: object, kind: object, depth: int) -> None:
    """Only msgpack's plain types (msgpack already bounds sizes); no NaN; bounded depth."""
    if depth > MAX_DEPTH:
        raise ProtocolError(f"{kind}: record nesting deeper than {MAX_DEPTH}")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ProtocolError(f"{kind}: record map keys must be strings")
            _check_plain(v, kind, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_plain(v, kind, depth + 1)
    elif isinstance(value, float):
        if math.isnan(value):
            raise ProtocolError(f"{kind}: NaN in a record")
    elif value is not None and not isinstance(value, bool | int | str | bytes):
        raise ProtocolError(f"{kind}: unexpected {type(value).__name__} in a record")


# ---------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, kw_only=True)
class Message:
    """Base of every message: ``TYPE`` is the wire's ``t``."""

    TYPE: ClassVar[str]

    def to_wire(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Message:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class Request(Message):
    """Expects exactly one reply carrying the same ``id``; the connection assigns ids."""

    id: int = 0
    LARGE_REPLY: ClassVar[bool] = False
    """Its reply may carry a chunk: the answering side reserves send memory first."""


@dataclass(frozen=True, kw_only=True)
class Reply(Message):
    """Answers the request with the same ``id``."""

    id: int = 0


@dataclass(frozen=True, kw_only=True)
class Hello(Message):
    """First frame each way; may be re-sent to update what it advertises."""

    TYPE: ClassVar[str] = "hello"
    version: int = PROTOCOL_VERSION
    listen: str | None = None
    peers: tuple[tuple[str, str], ...] = ()
    """``(node id, address)`` of peers the sender knows; the id is only a hint."""
    index_id: int = 0
    sequence: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": self.TYPE,
            "version": self.version,
            "listen": self.listen,
            "peers": [list(p) for p in self.peers],
            "index_id": self.index_id,
            "sequence": self.sequence,
        }

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Hello:
        return cls(
            version=_int(m, "version"),
            listen=_opt_address(m, "listen"),
            peers=_peer_list(m, "peers"),
            index_id=_int(m, "index_id", _U64),
            sequence=_int(m, "sequence"),
        )


@dataclass(frozen=True, kw_only=True)
class IndexSince(Request):
    """Ask for the records the peer changed after ``since`` in its index ``index_id``."""

    TYPE: ClassVar[str] = "index_since"
    index_id: int
    since: int

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TYPE, "id": self.id, "index_id": self.index_id, "since": self.since}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> IndexSince:
        return cls(id=_req_id(m), index_id=_int(m, "index_id", _U64), since=_int(m, "since"))


@dataclass(frozen=True, kw_only=True)
class Index(Reply):
    """One page of records; ``sequence`` is the last one included, ``more`` asks for another."""

    TYPE: ClassVar[str] = "index"
    index_id: int
    sequence: int
    records: tuple[dict[str, Any], ...] = ()
    more: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": self.TYPE,
            "id": self.id,
            "index_id": self.index_id,
            "sequence": self.sequence,
            "records": list(self.records),
            "more": self.more,
        }

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Index:
        return cls(
            id=_req_id(m),
            index_id=_int(m, "index_id", _U64),
            sequence=_int(m, "sequence"),
            records=_records(m, "records"),
            more=_bool(m, "more"),
        )


@dataclass(frozen=True, kw_only=True)
class Announce(Message):
    """Push: the changes of the sender's index after ``after`` up to ``sequence``.

    ``records`` are those changes, less the ones the receiver made itself (it has
    them already; DESIGN.md §6: an applied change is not announced back to its
    source). A receiver that holds everything up to ``after`` is then up to date
    to ``sequence``; one that does not pulls.
    """

    TYPE: ClassVar[str] = "announce"
    index_id: int
    after: int
    sequence: int
    records: tuple[dict[str, Any], ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": self.TYPE,
            "index_id": self.index_id,
            "after": self.after,
            "sequence": self.sequence,
            "records": list(self.records),
        }

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Announce:
        after, sequence = _int(m, "after"), _int(m, "sequence")
        if after >= sequence:
            raise ProtocolError("announce: 'after' must be below 'sequence'")
        return cls(
            index_id=_int(m, "index_id", _U64),
            after=after,
            sequence=sequence,
            records=_records(m, "records"),
        )


@dataclass(frozen=True, kw_only=True)
class ChunkPut(Request):
    """Store this chunk; the receiver checks ``data`` against ``chunk_id`` first."""

    TYPE: ClassVar[str] = "chunk_put"
    chunk_id: bytes
    data: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TYPE, "id": self.id, "chunk_id": self.chunk_id, "data": self.data}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> ChunkPut:
        return cls(
            id=_req_id(m),
            chunk_id=_bytes(m, "chunk_id", CHUNK_ID_SIZE, exact=True),
            data=_bytes(m, "data", MAX_CHUNK_DATA),
        )


@dataclass(frozen=True, kw_only=True)
class ChunkGet(Request):
    TYPE: ClassVar[str] = "chunk_get"
    LARGE_REPLY: ClassVar[bool] = True
    chunk_id: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TYPE, "id": self.id, "chunk_id": self.chunk_id}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> ChunkGet:
        return cls(id=_req_id(m), chunk_id=_bytes(m, "chunk_id", CHUNK_ID_SIZE, exact=True))


@dataclass(frozen=True, kw_only=True)
class Chunk(Reply):
    """A chunk's ciphertext; the requester checks it against ``chunk_id``."""

    TYPE: ClassVar[str] = "chunk"
    chunk_id: bytes
    data: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TYPE, "id": self.id, "chunk_id": self.chunk_id, "data": self.data}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Chunk:
        return cls(
            id=_req_id(m),
            chunk_id=_bytes(m, "chunk_id", CHUNK_ID_SIZE, exact=True),
            data=_bytes(m, "data", MAX_CHUNK_DATA),
        )


@dataclass(frozen=True, kw_only=True)
class Missing(Reply):
    TYPE: ClassVar[str] = "missing"
    chunk_id: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TYPE, "id": self.id, "chunk_id": self.chunk_id}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Missing:
        return cls(id=_req_id(m), chunk_id=_bytes(m, "chunk_id", CHUNK_ID_SIZE, exact=True))


@dataclass(frozen=True, kw_only=True)
class Stored(Reply):
    """``chunk_put`` succeeded: the chunk is stored (verified against its id) on the peer."""

    TYPE: ClassVar[str] = "stored"
    chunk_id: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TYPE, "id": self.id, "chunk_id": self.chunk_id}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Stored:
        return cls(id=_req_id(m), chunk_id=_bytes(m, "chunk_id", CHUNK_ID_SIZE, exact=True))


@dataclass(frozen=True, kw_only=True)
class Ping(Request):
    TYPE: ClassVar[str] = "ping"

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TYPE, "id": self.id}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Ping:
        return cls(id=_req_id(m))


@dataclass(frozen=True, kw_only=True)
class Pong(Reply):
    TYPE: ClassVar[str] = "pong"

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TYPE, "id": self.id}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Pong:
        return cls(id=_req_id(m))


# Error codes a reply may carry; peers must accept codes they do not know.
UNKNOWN_TYPE = "unknown_type"
NO_SPACE = "no_space"
INTERNAL = "internal"
BAD_REQUEST = "bad_request"


@dataclass(frozen=True, kw_only=True)
class Error(Reply):
    """A request that could not be served: machine-readable ``code``, human ``text``."""

    TYPE: ClassVar[str] = "error"
    code: str
    text: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TYPE, "id": self.id, "code": self.code, "text": self.text}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Error:
        return cls(id=_req_id(m), code=_str(m, "code", 64), text=_str(m, "text", MAX_TEXT))


@dataclass(frozen=True, kw_only=True)
class UnknownRequest(Message):
    """A well-formed frame of a type this version does not speak.

    With an ``id`` it is answered with an ``unknown_type`` error; without one
    (a push) it is ignored. Either way the connection stays up.
    """

    TYPE: ClassVar[str] = "?"
    type_name: str
    id: int | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"t": self.type_name}
        if self.id is not None:
            wire["id"] = self.id
        return wire

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> UnknownRequest:
        name = _str(m, "t", 64)
        return cls(type_name=name, id=_req_id(m) if "id" in m else None)


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        IndexSince,
        Index,
        Announce,
        ChunkPut,
        ChunkGet,
        Chunk,
        Missing,
        Stored,
        Ping,
        Pong,
        Error,
    )
}
