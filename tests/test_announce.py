"""``meta.sync.IndexSync.announce_to``: one announcing task per peer, on a real database.

The peer is a stand-in that records what it is sent (the wire and the
connection are tested in ``test_peer.py``); everything else is the real thing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from swarmfs.fs.content import ChunkIO
from swarmfs.meta.db import Database, now_ns
from swarmfs.meta.records import Kind
from swarmfs.meta.sync import IndexSync
from swarmfs.net.wire import Announce, Hello, Message
from swarmfs.store.cas import ChunkStore

NODE = "aaaaaaaaaaaaaaaaaaaaaaaaaa"
KEY = bytes(range(32))


class RecordingPeer:
    """Keeps what it is sent; ``fail_sends`` sends raise a bug-like error first."""

    def __init__(self, peer_id: str, hello: Hello | None, fail_sends: int = 0) -> None:
        self.peer_id = peer_id
        self.first_hello = hello
        self.sent: list[Announce] = []
        self.fail_sends = fail_sends
        self.arrived = trio.Event()

    async def send(self, msg: Message) -> None:
        if self.fail_sends:
            self.fail_sends -= 1
            raise RuntimeError("a bug in sending")
        assert isinstance(msg, Announce)
        self.sent.append(msg)
        self.arrived.set()

    def paths(self) -> list[bytes]:
        return [m["p"] for msg in self.sent for m in msg.records]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "swarmfs.db", NODE)
    yield database
    database.close()


def _sync(db: Database, tmp_path: Path) -> IndexSync:
    async def applied(_: object) -> None:
        pass

    return IndexSync(db, ChunkIO(ChunkStore(tmp_path / "chunks"), KEY), applied)


def _create(db: Database, path: bytes) -> None:
    db.write_sync(lambda t: t.create(path, Kind.FILE, 0o644, 0, 0, now_ns(), b""))


def _hello(db: Database) -> Hello:
    return Hello(listen=None, peers=(), index_id=db.reader.index_id(), sequence=db.sequence)


async def test_a_change_made_between_the_hello_and_the_announcer_s_start_is_announced(
    db: Database, tmp_path: Path
) -> None:
    """Regression test: the announcer started from the sequence when its task first
    ran; a change committed after the hello (which the peer's pull may already have
    been answered without) reached the peer only with the next change."""
    sync = _sync(db, tmp_path)
    peer = RecordingPeer("b" * 26, _hello(db))
    _create(db, b"between")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sync.announce_to, peer)
            await peer.arrived.wait()
            nursery.cancel_scope.cancel()
    assert peer.paths() == [b"between"]
    assert peer.sent[0].after == peer.first_hello.sequence  # type: ignore[union-attr]


async def test_a_failing_announce_is_tried_again_not_given_up(
    db: Database, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Regression test: an error in one page ended the peer's announcing task (it used
    to run under the node's service supervisor); the peer heard nothing more until
    it reconnected."""
    sync = _sync(db, tmp_path)
    peer = RecordingPeer("b" * 26, _hello(db), fail_sends=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sync.announce_to, peer)
        await trio.testing.wait_all_tasks_blocked()
        _create(db, b"one")
        await db.write(lambda t: None)  # wakes the announcer as a commit on the loop does
        with trio.fail_after(30):
            await peer.arrived.wait()
        nursery.cancel_scope.cancel()
    assert peer.paths() == [b"one"]


async def test_every_peer_gets_its_own_page_even_when_pages_share_their_ends(
    db: Database, tmp_path: Path
) -> None:
    """The page exported for one peer is reused for the next only if it is the same
    page: a row changed again in between leaves it, while the page can still start and
    end at the same sequences (it is cut by size)."""
    sync = _sync(db, tmp_path)
    since = db.sequence
    for name in (b"a", b"c", b"b"):
        _create(db, name)
    first, _ = sync._page(since)
    second = [first[0], first[2]]  # c changed again: same ends, one row fewer
    assert [m["p"] for m in await sync._export_shared(first)] == [b"a", b"c", b"b"]
    assert [m["p"] for m in await sync._export_shared(second)] == [b"a", b"b"]
