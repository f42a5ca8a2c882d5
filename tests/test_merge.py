"""Merge rules (DESIGN.md §3): one test per rule, then hypothesis properties.

The properties simulate a few nodes that edit on top of what they have seen
and sometimes sync, collect every record any node ever held, and deliver them
to fresh replicas in random orders with duplicates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from swarmfs.meta.merge import Namespace, conflict_name, directory_is_live, resolve
from swarmfs.meta.records import Block, Kind, Order, Record, VersionVector, parent_of

A, B, C = "A" * 26, "B" * 26, "C" * 26
NODES = (A, B, C)
SECOND = 1_000_000_000
T0 = 1_700_000_000 * SECOND  # 2023-11-14 22:13:20 UTC


def vv(**counters: int) -> VersionVector:
    return VersionVector.of({name * 26: n for name, n in counters.items()})


def blocks(content: int) -> tuple[Block, ...]:
    return (Block(bytes([content]) * 32, bytes([content]) * 32, content + 1),)


def file(
    version: VersionVector,
    by: str,
    mtime_ns: int,
    content: int = 1,
    path: bytes = b"notes.txt",
    mode: int = 0o644,
) -> Record:
    return Record(
        path=path,
        kind=Kind.FILE,
        mode=mode,
        uid=1000,
        gid=1000,
        size=content + 1,
        mtime_ns=mtime_ns,
        version=version,
        modified_by=by,
        blocks=blocks(content),
    )


def directory(
    version: VersionVector, by: str, mtime_ns: int, path: bytes = b"notes.txt", mode: int = 0o755
) -> Record:
    return Record(path, Kind.DIR, mode, 1000, 1000, 0, mtime_ns, version, by)


def tombstone(r: Record, version: VersionVector, by: str, mtime_ns: int) -> Record:
    return dataclasses.replace(
        r, deleted=True, blocks=(), size=0, version=version, modified_by=by, mtime_ns=mtime_ns
    )


def both_orders(a: Record, b: Record):
    """resolve(a, b), after checking that resolve(b, a) agrees on the outcome."""
    ab, ba = resolve(a, b), resolve(b, a)
    assert (ab.winner, ab.conflict) == (ba.winner, ba.conflict)
    return ab


def apply_all(records: Iterable[Record]) -> Namespace:
    ns = Namespace()
    for r in records:
        ns.apply(r)
    return ns


# --- conflict names ---------------------------------------------------------


def test_conflict_name_uses_loser_mtime_in_utc_and_node8() -> None:
    loser = file(vv(B=1), "BCDEFGHIJK" + "Q" * 16, T0 + 999_999_999)
    stamp = b"20231114-221320-BCDEFGHI"
    assert conflict_name(b"report.txt", loser) == b"report.sync-conflict-" + stamp + b".txt"
    assert conflict_name(b"archive.tar.gz", loser) == b"archive.tar.sync-conflict-" + stamp + b".gz"
    assert conflict_name(b"Makefile", loser) == b"Makefile.sync-conflict-" + stamp
    assert conflict_name(b".bashrc", loser) == b".bashrc.sync-conflict-" + stamp
    assert conflict_name(b"v1.2/Makefile", loser) == b"v1.2/Makefile.sync-conflict-" + stamp
    assert conflict_name(b"d/e/a.md", loser) == b"d/e/a.sync-conflict-" + stamp + b".md"


def test_conflict_name_before_1970() -> None:
    loser = file(vv(B=1), B, -1)
    assert conflict_name(b"x", loser) == b"x.sync-conflict-19691231-235959-BBBBBBBB"


# --- one rule per test --------------------------------------------------------


def test_first_record_for_a_path_is_taken() -> None:
    r = file(vv(A=1), A, T0)
    assert resolve(None, r).winner == r and resolve(None, r).changed


def test_dominating_version_wins_even_with_an_older_mtime() -> None:
    old = file(vv(A=1), A, T0 + 10 * SECOND, content=1)
    new = file(vv(A=1, B=1), B, T0, content=2)  # e.g. tar -x restored an old mtime
    assert resolve(old, new) == resolve(None, new)
    assert resolve(new, old).winner == new and not resolve(new, old).changed


def test_equal_records_are_no_change() -> None:
    r = file(vv(A=2), A, T0)
    assert resolve(r, r) == resolve(r, dataclasses.replace(r)) and not resolve(r, r).changed


def test_concurrent_edits_later_mtime_wins_and_loser_is_kept() -> None:
    mine = file(vv(A=2), A, T0 + 5 * SECOND, content=1)
    theirs = file(vv(A=1, B=1), B, T0, content=2)
    res = both_orders(mine, theirs)
    assert res.winner == dataclasses.replace(mine, version=vv(A=2, B=1))
    assert res.conflict == dataclasses.replace(
        theirs, path=b"notes.sync-conflict-20231114-221320-BBBBBBBB.txt"
    )
    assert resolve(mine, theirs).changed and resolve(theirs, mine).changed


def test_concurrent_edits_mtime_tie_goes_to_larger_node_id() -> None:
    a, b = file(vv(A=1), A, T0, content=1), file(vv(B=1), B, T0, content=2)
    res = both_orders(a, b)
    assert res.winner.blocks == b.blocks and res.winner.version == vv(A=1, B=1)
    assert res.conflict is not None and res.conflict.blocks == a.blocks
    assert res.conflict.version == a.version and not res.conflict.deleted


def test_identical_content_is_not_a_conflict() -> None:
    a = file(vv(A=1), A, T0, content=3, mode=0o600)
    b = file(vv(B=1), B, T0 + SECOND, content=3, mode=0o640)
    res = both_orders(a, b)
    assert res.conflict is None
    assert res.winner == dataclasses.replace(b, version=vv(A=1, B=1))


def test_concurrent_tombstones_are_identical() -> None:
    r = file(vv(A=1), A, T0)
    da, db = tombstone(r, vv(A=2), A, T0 + 2 * SECOND), tombstone(r, vv(A=1, B=1), B, T0)
    res = both_orders(da, db)
    assert res.conflict is None and res.winner == dataclasses.replace(da, version=vv(A=2, B=1))


def test_edit_wins_over_concurrent_delete() -> None:
    r = file(vv(A=1), A, T0)
    deleted = tombstone(r, vv(A=2), A, T0 + 9 * SECOND)  # later than the edit
    edited = file(vv(A=1, B=1), B, T0 + SECOND, content=2)
    res = both_orders(deleted, edited)
    assert res.winner == dataclasses.replace(edited, version=vv(A=2, B=1))
    assert res.conflict is None


def test_directory_keeps_the_name_against_a_file() -> None:
    d = directory(vv(A=1), A, T0, path=b"build")
    f = file(vv(B=1), B, T0 + SECOND, path=b"build")  # later, still loses
    res = both_orders(d, f)
    assert res.winner == dataclasses.replace(d, version=vv(A=1, B=1))
    assert res.conflict == dataclasses.replace(
        f, path=b"build.sync-conflict-20231114-221321-BBBBBBBB"
    )


def test_directory_keeps_the_name_against_a_symlink() -> None:
    d = directory(vv(A=1), A, T0, path=b"lib")
    link = Record(b"lib", Kind.SYMLINK, 0o777, 0, 0, 3, T0 + SECOND, vv(B=1), B, target=b"lib64")
    res = both_orders(d, link)
    assert res.winner.kind is Kind.DIR and res.conflict is not None
    assert res.conflict.target == b"lib64"


def test_concurrent_directory_metadata_never_conflicts() -> None:
    a = directory(vv(A=1), A, T0 + SECOND, mode=0o700)
    b = directory(vv(B=1), B, T0, mode=0o755)
    res = both_orders(a, b)
    assert res.conflict is None
    assert res.winner == dataclasses.replace(a, version=vv(A=1, B=1))


def test_an_overwritten_conflict_winner_is_not_kept_again() -> None:
    """A merged record's vector covers the loser too; an edit on top of the
    winner alone still replaced the winner's content on purpose."""
    x = file(vv(A=1), A, T0 + 5 * SECOND, content=1)
    w = file(vv(B=1), B, T0, content=2)
    merged = resolve(x, w).winner  # x's content, vector {A:1, B:1}
    z = file(vv(A=2), A, T0 + 9 * SECOND, content=3)  # A edits x, never saw w
    res = both_orders(merged, z)
    assert res.winner == dataclasses.replace(z, version=vv(A=2, B=1)) and res.conflict is None


def test_author_without_a_counter_is_never_taken_as_seen() -> None:
    """A malformed record (its author has no counter) must not lose its content."""
    odd = file(vv(B=1), C, T0, content=2)
    res = both_orders(file(vv(A=1), A, T0 + SECOND), odd)
    assert res.conflict == dataclasses.replace(odd, path=conflict_name(odd.path, odd))


def test_directory_deleted_while_a_child_was_added_comes_back() -> None:
    d = directory(vv(A=1), A, T0, path=b"d")
    child = file(vv(B=1), B, T0 + SECOND, path=b"d/new.txt")
    gone = tombstone(d, vv(A=2), A, T0 + 2 * SECOND)
    for order in ([d, child, gone], [d, gone, child], [child, gone, d]):
        ns = apply_all(order)
        assert ns.records[b"d"].deleted
        assert ns.visible() == {b"d", b"d/new.txt"}
    assert directory_is_live(gone, live_descendant=True)
    assert not directory_is_live(gone, live_descendant=False)
    assert directory_is_live(d, live_descendant=False)
    assert directory_is_live(None, live_descendant=True)


def test_namespace_stores_the_conflict_copy_and_redelivery_changes_nothing() -> None:
    a, b = file(vv(A=1), A, T0 + SECOND, content=1), file(vv(B=1), B, T0, content=2)
    ns = apply_all([a, b])
    copy = b.path.replace(b".txt", b".sync-conflict-20231114-221320-BBBBBBBB.txt")
    assert ns.records[copy] == dataclasses.replace(b, path=copy)
    assert ns.visible() == {b"notes.txt", copy}
    assert not any(ns.apply(r) for r in [a, b, *ns.records.values()])


def test_deleted_conflict_copy_stays_deleted() -> None:
    a, b = file(vv(A=1), A, T0 + SECOND, content=1), file(vv(B=1), B, T0, content=2)
    ns = apply_all([a, b])
    (copy_path,) = set(ns.records) - {a.path}
    copy = ns.records[copy_path]
    ns.apply(tombstone(copy, copy.version.bump(A), A, T0 + 5 * SECOND))
    assert not ns.apply(b) and not ns.apply(resolve(a, b).conflict)  # type: ignore[arg-type]
    assert ns.visible() == {a.path}


def test_delete_of_a_conflict_winner_depends_on_order_until_replicas_exchange() -> None:
    """The documented limit of pairwise merging: A writes x then deletes it, B
    concurrently writes w. A replica that saw x and w first kept w only as the
    conflict copy when the delete arrived; one that saw the delete first gives
    the path to w. Nothing is lost, and exchanging records converges."""
    x = file(vv(A=1), A, T0 + 5 * SECOND, content=1)
    w = file(vv(B=1), B, T0, content=2)
    y = tombstone(x, vv(A=2), A, T0 + 6 * SECOND)
    first, second = apply_all([x, w, y]), apply_all([x, y, w])
    assert first.records[x.path].deleted and not second.records[x.path].deleted
    exchange([first, second])
    assert first.records == second.records
    assert first.records[x.path] == dataclasses.replace(w, version=vv(A=2, B=1))


# --- properties ---------------------------------------------------------------

PATHS = (b"a.txt", b"d", b"d/g")


def exchange(replicas: list[Namespace]) -> None:
    """Anti-entropy: every replica applies every other's records until none changes
    (DESIGN.md §5: every applied change, conflict copies included, is announced)."""
    for _ in range(20):
        snapshots = [sorted(r.records.values(), key=repr) for r in replicas]
        changed = False
        for i, replica in enumerate(replicas):
            for j, records in enumerate(snapshots):
                for r in records if i != j else ():
                    changed |= replica.apply(r)
        if not changed:
            return
    raise AssertionError("replicas did not settle")


op_strategy = st.tuples(
    st.sampled_from(["write", "mkdir", "chmod", "delete", "sync"]),
    st.integers(0, 2),  # node
    st.integers(0, 2),  # path, or the peer to sync from
    st.integers(0, 3),  # content or mode
    st.integers(0, 4),  # mtime in seconds: ties and clock skew included
)


class Simulation:
    """Nodes that edit on top of what they have seen and sometimes pull a peer's state."""

    def __init__(self) -> None:
        self.nodes = [Namespace() for _ in NODES]
        self.held: set[Record] = set()  # every record any node ever held
        self.edits: list[Record] = []  # the original (non-merge) records

    def run(self, ops: list[tuple[str, int, int, int, int]]) -> None:
        for kind, n, target, value, seconds in ops:
            ns, node = self.nodes[n], NODES[n]
            if kind == "sync":
                for r in sorted(self.nodes[target].records.values(), key=repr):
                    ns.apply(r)
            else:
                edit = self._edit(ns, node, kind, PATHS[target], value, T0 + seconds * SECOND)
                if edit is not None:
                    ns.apply(edit)
                    self.edits.append(edit)
            self.held.update(ns.records.values())

    @staticmethod
    def _edit(
        ns: Namespace, node: str, kind: str, path: bytes, value: int, mtime_ns: int
    ) -> Record | None:
        """The record a local operation commits, or None where POSIX refuses it."""
        cur = ns.records.get(path)
        live = cur is not None and not cur.deleted
        visible = ns.visible()

        def is_dir(p: bytes) -> bool:  # a live directory record, or one kept by descendants
            r = ns.records.get(p)
            return p in visible and (r is None or r.deleted or r.kind is Kind.DIR)

        if parent_of(path) and not is_dir(parent_of(path)):
            return None  # ENOENT / ENOTDIR
        has_children = any(p.startswith(path + b"/") for p in visible)
        version = (cur.version if cur is not None else VersionVector()).bump(node)
        if kind == "write" and not is_dir(path):
            return file(version, node, mtime_ns, content=value, path=path)
        if kind == "mkdir" and path not in visible:
            return directory(version, node, mtime_ns, path=path)
        if kind == "chmod" and live:
            return dataclasses.replace(cur, mode=0o600 + value, version=version, modified_by=node)
        if kind == "delete" and live and not has_children:  # rmdir of a non-empty dir: ENOTEMPTY
            return tombstone(cur, version, node, mtime_ns)
        return None

    def deliveries(self, data: st.DataObject) -> list[list[Record]]:
        """Three delivery orders of everything held, each with some duplicates."""
        universe = sorted(self.held, key=repr)
        orders = []
        for _ in range(3):
            dups = data.draw(st.lists(st.sampled_from(universe), max_size=8)) if universe else []
            orders.append(data.draw(st.permutations(universe + dups)))
        return orders


def replaced(e: Record, edits: list[Record]) -> bool:
    """Whether someone edited on top of ``e``'s bytes at its path (seen and replaced)."""
    return any(
        o.path == e.path
        and o.blocks == e.blocks
        and any(n.path == e.path and n.version.compare(o.version) is Order.AFTER for n in edits)
        for o in edits
    )


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(op_strategy, min_size=10, max_size=30), data=st.data())
def test_replicas_converge_whatever_the_delivery_order(
    ops: list[tuple[str, int, int, int, int]], data: st.DataObject
) -> None:
    sim = Simulation()
    sim.run(ops)
    replicas = [apply_all(order) for order in sim.deliveries(data)]
    exchange(replicas)
    first = replicas[0]
    assert all(r.records == first.records for r in replicas[1:])
    # Nothing silently dropped: file content that no edit was made on top of (no
    # edit of those same bytes at that path is dominated by another edit) is readable.
    live_blocks = {r.blocks for r in first.records.values() if not r.deleted}
    for e in sim.edits:
        if e.kind is Kind.FILE and not e.deleted and not replaced(e, sim.edits):
            assert e.blocks in live_blocks


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(op_strategy, min_size=10, max_size=24))
def test_resolve_does_not_depend_on_argument_order(
    ops: list[tuple[str, int, int, int, int]],
) -> None:
    sim = Simulation()
    sim.run(ops)
    records = sorted(sim.held, key=repr)
    for a in records:
        for b in records:
            if a.path == b.path:
                ab, ba = resolve(a, b), resolve(b, a)
                assert (ab.winner, ab.conflict) == (ba.winner, ba.conflict)


@settings(max_examples=300, deadline=None)
@given(
    mtimes=st.lists(st.integers(0, 3), min_size=3, max_size=3),
    contents=st.lists(st.integers(0, 3), min_size=3, max_size=3),
    order=st.permutations(range(3)),
)
def test_concurrent_file_edits_keep_every_content(
    mtimes: list[int], contents: list[int], order: list[int]
) -> None:
    base = VersionVector.of({A: 1})
    edits = [
        file(base.bump(node), node, T0 + mtimes[i], content=contents[i])
        for i, node in enumerate(NODES)
    ]
    ns = apply_all(edits[i] for i in order)
    live = [r for r in ns.records.values() if not r.deleted]
    assert {r.blocks for r in live} == {e.blocks for e in edits}
    assert ns.records[b"notes.txt"].version == VersionVector.of({A: 2, B: 1, C: 1})
