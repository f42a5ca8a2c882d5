"""Fuzz targets for what a peer can send (DESIGN.md §5): no atheris needed to import.

- ``wire(data)``: ``data[1:]`` is fed to a ``FrameDecoder`` in two pieces (the
  split point taken from ``data[0]``) and every complete frame goes through
  ``decode_message``. Only ``ProtocolError`` may come out; a message that
  decodes must encode again (``to_wire``).
- ``records(data)``: ``data`` is a msgpack body decoded with the wire's limits;
  a map goes through ``record_from_map``. Only ``InvalidRecord`` may come out,
  and an accepted record must satisfy the path rules ``check_path`` enforces
  and survive ``record_to_map`` / ``record_from_map`` unchanged.

Any other exception is a finding. ``fuzz/run.py`` drives these with atheris;
``tests/test_fuzz_corpus.py`` replays the saved corpus in CI.
"""

from __future__ import annotations

import msgpack

from swarmfs.errors import ProtocolError
from swarmfs.meta.wireform import InvalidRecord, record_from_map, record_to_map
from swarmfs.net import wire


def wire_target(data: bytes) -> None:
    if not data:
        return
    decoder = wire.FrameDecoder()
    stream = data[1:]
    cut = data[0] % (len(stream) + 1)
    try:
        for piece in (stream[:cut], stream[cut:]):
            for body in decoder.feed(piece):
                msg = wire.decode_message(body)
                if not isinstance(msg, wire.UnknownRequest):
                    again = wire.decode_message(wire.encode_frame(msg)[wire.HEADER_SIZE :])
                    assert again == msg, (msg, again)
    except ProtocolError:
        pass


def records_target(data: bytes) -> None:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, **wire._UNPACK_LIMITS)
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException):
        return
    if not isinstance(obj, dict):
        return
    try:
        rec, manifests = record_from_map(obj)
    except InvalidRecord:
        return
    parts = rec.path.split(b"/")
    assert rec.path and b"\0" not in rec.path and not {b"", b".", b".."} & set(parts), rec.path
    if manifests is None:
        again, _ = record_from_map(record_to_map(rec))
        assert again == rec, (rec, again)


TARGETS = {"wire": wire_target, "records": records_target}
