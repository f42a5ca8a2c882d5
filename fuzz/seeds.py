"""Write the hand-made seed inputs into fuzz/corpus/ (valid messages of every type,
records of every kind, and a few classic malformations). Run once; fuzzing grows it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgpack

from swarmfs.net import wire

HERE = Path(__file__).resolve().parent
NODE = "a" * 26
CID = bytes(range(32))


def save(kind: str, data: bytes) -> None:
    out = HERE / "corpus" / kind
    out.mkdir(parents=True, exist_ok=True)
    (out / hashlib.sha1(data).hexdigest()).write_bytes(data)


def main() -> None:
    rec = {
        "p": b"dir/file.txt", "k": "file", "m": 0o644, "u": 0, "g": 0, "s": 5, "t": 1,
        "v": {NODE: 1}, "by": NODE, "d": False, "b": [[CID, CID, 5]], "q": 1,
    }  # fmt: skip
    records = [
        rec,
        {**rec, "p": b"d", "k": "dir", "s": 0, "b": []},
        {**rec, "p": b"l", "k": "symlink", "s": 3, "l": b"../x", "b": []},
        {**rec, "d": True},
        {**rec, "b": [[None, None, 4096]], "s": 4096},
        {**rec, "mf": [[CID, CID]], "n": 2000, "s": 2000 << 20},
        {**rec, "p": b"../x"},
        {**rec, "p": b"/abs"},
        {**rec, "p": b"a/../../b"},
        {**rec, "p": b"nul\0"},
        {**rec, "v": {f"{i:026d}": 1 for i in range(5000)}},
    ]
    for r in records:
        save("records", msgpack.packb(r, use_bin_type=True))
    messages = [
        wire.Hello(listen="10.0.0.1:3000", peers=((NODE, "[::1]:7"),), index_id=5, sequence=9),
        wire.IndexSince(id=1, index_id=2, since=3),
        wire.Index(id=1, index_id=2, sequence=3, records=(rec,), more=True),
        wire.Announce(index_id=2, after=2, sequence=3, records=(rec,)),
        wire.ChunkPut(id=4, chunk_id=CID, data=b"\x01" * 100),
        wire.ChunkGet(id=5, chunk_id=CID),
        wire.Chunk(id=5, chunk_id=CID, data=b"x"),
        wire.Missing(id=5, chunk_id=CID),
        wire.Stored(id=4, chunk_id=CID),
        wire.Ping(id=6),
        wire.Pong(id=6),
        wire.Error(id=7, code="no_space", text="full"),
    ]
    frames = [wire.encode_frame(m) for m in messages]
    for f in frames:
        save("wire", b"\x00" + f)
    save("wire", b"\x10" + b"".join(frames[:4]))
    for body in (b"\xc1", msgpack.packb([1]), msgpack.packb({"t": "zz", "id": 1}),
                 msgpack.packb({"t": "ping", "id": -1})):  # fmt: skip
        save("wire", b"\x00" + len(body).to_bytes(4, "big") + body)
    save("wire", b"\x00\xff\xff\xff\xff")


if __name__ == "__main__":
    main()
