"""Frames and messages without sockets: limits, validation, exact round trips."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmfs.errors import ProtocolError
from swarmfs.net import wire
from swarmfs.net.wire import (
    MAX_FRAME,
    Announce,
    Chunk,
    ChunkGet,
    ChunkPut,
    Error,
    FrameDecoder,
    Hello,
    Index,
    IndexSince,
    Message,
    Missing,
    Ping,
    Pong,
    Stored,
    UnknownRequest,
    decode_frames,
    decode_message,
    encode_frame,
    parse_address,
)

ids = st.integers(0, 2**63 - 1)
u64 = st.integers(0, 2**64 - 1)
node_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567", min_size=26, max_size=26)
chunk_ids = st.binary(min_size=32, max_size=32)
chunk_data = st.binary(max_size=4096)
addresses = st.one_of(
    st.builds(
        lambda a, b, p: f"10.{a}.{b}.1:{p}",
        st.integers(0, 255),
        st.integers(0, 255),
        st.integers(1, 65535),
    ),
    st.builds(lambda p: f"[::1]:{p}", st.integers(1, 65535)),
    st.builds(
        lambda h, p: f"{h}.example:{p}",
        st.from_regex(r"[a-z]{1,12}", fullmatch=True),
        st.integers(1, 65535),
    ),
)
plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
records = st.lists(st.dictionaries(st.text(max_size=8), plain, max_size=5), max_size=5).map(tuple)

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        Hello,
        version=st.integers(0, 10),
        listen=st.none() | addresses,
        peers=st.lists(st.tuples(node_ids, addresses), max_size=5).map(tuple),
        index_id=u64,
        sequence=ids,
    ),
    st.builds(IndexSince, id=ids, index_id=u64, since=ids),
    st.builds(Index, id=ids, index_id=u64, sequence=ids, records=records, more=st.booleans()),
    ids.filter(lambda n: n > 0).flatmap(
        lambda seq: st.builds(
            Announce,
            index_id=u64,
            after=st.integers(0, seq - 1),
            sequence=st.just(seq),
            records=records,
        )
    ),
    st.builds(ChunkPut, id=ids, chunk_id=chunk_ids, data=chunk_data),
    st.builds(Stored, id=ids, chunk_id=chunk_ids),
    st.builds(ChunkGet, id=ids, chunk_id=chunk_ids),
    st.builds(Chunk, id=ids, chunk_id=chunk_ids, data=chunk_data),
    st.builds(Missing, id=ids, chunk_id=chunk_ids),
    st.builds(Ping, id=ids),
    st.builds(Pong, id=ids),
    st.builds(Error, id=ids, code=st.text(max_size=64), text=st.text(max_size=200)),
)


@given(messages)
def test_every_valid_message_round_trips_exactly(msg: Message) -> None:
    frame = encode_frame(msg)
    (got,) = list(decode_frames(FrameDecoder(), frame))
    assert got == msg
    assert type(got) is type(msg)


@given(st.lists(messages, min_size=1, max_size=5), st.data())
def test_frames_reassemble_across_arbitrary_splits(
    msgs: list[Message], data: st.DataObject
) -> None:
    stream = b"".join(encode_frame(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = FrameDecoder()
    got: list[Message] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got.extend(decode_frames(decoder, stream[start:end]))
    assert got == msgs


@given(st.binary(max_size=2048))
def test_random_bytes_only_ever_raise_protocol_error(data: bytes) -> None:
    try:
        msgs = list(decode_frames(FrameDecoder(), data))
    except ProtocolError:
        return
    assert all(isinstance(m, Message) for m in msgs)


@given(st.binary(max_size=2048))
def test_random_frame_bodies_only_ever_raise_protocol_error(body: bytes) -> None:
    try:
        msg = decode_message(body)
    except ProtocolError:
        return
    assert isinstance(msg, Message)


wire_types = st.sampled_from([*wire.MESSAGE_TYPES, "nonsense"])
loose_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=10)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
field_names = st.sampled_from(
    [
        *("id", "version", "listen", "peers", "index_id", "sequence", "since", "records"),
        *("more", "chunk_id", "data", "code", "text", "x"),
    ]
)


@given(wire_types, st.dictionaries(field_names, loose_values, max_size=8))
def test_well_formed_maps_with_wrong_fields_only_raise_protocol_error(
    kind: str, fields: dict[str, object]
) -> None:
    body = msgpack.packb({"t": kind, **fields}, use_bin_type=True)
    try:
        msg = decode_message(body)
    except ProtocolError:
        return
    # Whatever was accepted must survive re-encoding unchanged.
    assert decode_message(encode_frame(msg)[4:]) == msg


def test_oversized_length_is_refused_before_the_body_arrives() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="exceeds"):
        list(decoder.feed(b"\xff\xff\xff\xff"))
    just_too_big = (MAX_FRAME + 1).to_bytes(4, "big")
    with pytest.raises(ProtocolError):
        list(FrameDecoder().feed(just_too_big))


def test_frames_before_an_oversized_header_come_out_first() -> None:
    frames = FrameDecoder().feed(encode_frame(Ping(id=1)) + b"\xff\xff\xff\xff")
    assert decode_message(next(frames)) == Ping(id=1)
    with pytest.raises(ProtocolError, match="exceeds"):
        next(frames)


def test_a_caller_that_stops_taking_frames_loses_nothing() -> None:
    """As exchange_hello does: take the first frame and leave. What came with it,
    whole frames and a frame in progress, stays in the decoder for the next taker."""
    msgs = [Hello(), ChunkGet(id=2, chunk_id=b"\1" * 32), Ping(id=3)]
    stream = b"".join(encode_frame(m) for m in msgs)
    cut = len(stream) - 2  # the ping's body is still in progress
    decoder = FrameDecoder()
    for body in decoder.feed(stream[:cut]):
        assert decode_message(body) == msgs[0]
        break
    assert decoder.pending == len(encode_frame(msgs[2])) - wire.HEADER_SIZE
    assert decode_message(decoder.next_frame() or b"") == msgs[1]
    assert decoder.next_frame() is None
    assert list(decode_frames(decoder, stream[cut:])) == msgs[2:]
    assert decoder.pending == 0 and decoder.next_frame() is None


def test_a_full_chunk_fits_in_one_frame() -> None:
    msg = ChunkPut(id=1, chunk_id=b"\x01" * 32, data=b"\x00" * (wire.MAX_CHUNK_DATA))
    assert len(encode_frame(msg)) <= MAX_FRAME + 4
    assert decode_message(encode_frame(msg)[4:]) == msg


def test_encoding_a_message_too_big_for_a_frame_is_a_bug() -> None:
    msg = Announce(index_id=1, after=0, sequence=1, records=({"blob": b"\x00" * MAX_FRAME},))
    with pytest.raises(ValueError, match="frame limit"):
        encode_frame(msg)


def test_unknown_type_with_id_becomes_an_unknown_request() -> None:
    body = msgpack.packb({"t": "from_the_future", "id": 7, "x": [1, 2]})
    assert decode_message(body) == UnknownRequest(type_name="from_the_future", id=7)
    assert decode_message(msgpack.packb({"t": "push_from_the_future"})) == UnknownRequest(
        type_name="push_from_the_future"
    )


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (msgpack.packb([1, 2]), "not a map"),
        (
            msgpack.packb(
                {"t": "hello", "version": 1, "listen": None, "peers": [["short", "h:1"]]}
                | {"index_id": 0, "sequence": 0}
            ),
            r"\[node id, address\]",
        ),
        (msgpack.packb({"id": 1}), "no message type"),
        (msgpack.packb({"t": "ping"}), "missing field 'id'"),
        (msgpack.packb({"t": "ping", "id": -1}), "'id' must be"),
        (msgpack.packb({"t": "ping", "id": True}), "'id' must be"),
        (msgpack.packb({"t": "chunk_get", "id": 1, "chunk_id": b"short"}), "exactly 32"),
        (msgpack.packb({"t": "chunk_get", "id": 1, "chunk_id": "x" * 32}), "exactly 32"),
        (msgpack.packb({"t": "ping", "id": 1}) + b"\x00", "undecodable"),
        (msgpack.packb({"t": "ping", "id": msgpack.ExtType(1, b"x")}), "undecodable"),
        (msgpack.packb({"t": "ping", "id": msgpack.Timestamp(1)}), "undecodable"),
        (b"\x81\x01\x02", "undecodable"),  # integer map key
        (b"\x81\xa1t\xa1\xff", "undecodable"),  # invalid UTF-8
        (b"\x91" * 5000 + b"\xc0", "undecodable"),  # nesting bomb
        (b"\xdd\xff\xff\xff\xff", "undecodable"),  # claims 4 G array items
        (
            msgpack.packb(
                {"t": "announce", "index_id": 1, "after": 0, "sequence": 1, "records": [1]}
            ),
            "entries must be maps",
        ),
        (
            msgpack.packb(
                {
                    "t": "announce",
                    "index_id": 1,
                    "after": 0,
                    "sequence": 1,
                    "records": [{"f": float("nan")}],
                }
            ),
            "NaN",
        ),
        (
            msgpack.packb(
                {
                    "t": "announce",
                    "index_id": 1,
                    "after": 0,
                    "sequence": 1,
                    "records": [{"k": {b"b": 1}}],
                }
            ),
            "keys must be strings",
        ),
        (
            msgpack.packb(
                {
                    "t": "hello",
                    "version": 1,
                    "listen": "nohost",
                    "peers": [],
                    "index_id": 0,
                    "sequence": 0,
                }
            ),
            "HOST:PORT",
        ),
    ],
)
def test_malformed_frames_are_typed_protocol_errors(body: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode_message(body)


def test_deeply_nested_records_are_refused() -> None:
    value: object = 1
    for _ in range(wire.MAX_DEPTH + 2):
        value = [value]
    body = msgpack.packb(
        {"t": "announce", "index_id": 1, "after": 0, "sequence": 1, "records": [{"v": value}]}
    )
    with pytest.raises(ProtocolError, match="nesting"):
        decode_message(body)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:3000", ("127.0.0.1", 3000)),
        ("[::1]:80", ("::1", 80)),
        ("host.lan:1", ("host.lan", 1)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected
    assert wire.format_address(*expected) == text


@pytest.mark.parametrize(
    "text", ["", "host", ":80", "host:", "host:0", "host:70000", "::1:80", "[zz]:1"]
)
def test_parse_address_refuses_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)
