"""Merge rules for namespace records (DESIGN.md §3), as pure functions.

``resolve`` is the single source of truth for what one path holds after a
record from a peer meets the local one; ``db.apply_remote`` and the reference
model ``Namespace`` both apply records through it. Nothing here does I/O or
keeps state, so it is safe from any thread or task.

Decisions where the design is silent:

* Concurrent means neither vector dominates. Equal vectors with *different*
  records (only produced by merges that happened in a different order on two
  nodes) are resolved by the same deterministic rules instead of "no change",
  so the two nodes converge once they exchange records rather than disagreeing
  forever under one version.
* A merged record carries the pointwise-maximum vector, so it may have "seen"
  an edit it did not win. When a record's vector already covers the edit whose
  content the other one shows (``_has_seen``), it replaced that content on
  purpose: it wins and no conflict copy is made. For two original edits this
  never applies (one would dominate); it stops a version that a user already
  overwrote from reappearing as a conflict copy.
* Winner order for everything else: live beats tombstone, a live directory
  beats a live non-directory, then the later ``mtime_ns``, then the larger
  ``modified_by``, then (only for records that agree on all of these) a fixed
  order of their ``repr`` so the choice is total.
* "Identical content": same kind and, for files, same blocks and size (a
  truncate up changes the size, not the blocks); for symlinks the same target;
  directories, fifos and sockets carry no content; two tombstones are identical.
* Conflict copies are made only for a live non-directory loser whose content
  differs from the winner's; directories never conflict and a tombstone has
  nothing to keep.

Limit, by construction: records are merged pairwise and one record is kept per
path, so one pass over the same records can end differently depending on their
order: (1) when a conflict's winner is later replaced by someone who saw only
the winner (no such rule order can satisfy "later mtime wins", "edit beats
delete" and "dominating wins" at once: ``tests/test_merge.py`` shows a case);
(2) a version that reached a node before its author's next edit gets its own
conflict copy there, and nowhere else. No content is lost either way, and
replicas agree once they exchange records, which sync does (every applied
change, conflict copies included, is announced).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from swarmfs.meta.records import Kind, Order, Record, join, parent_of

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Resolution:
    """What a path holds after a remote record met the local one.

    ``winner`` is the record for the path; ``changed`` says whether it differs
    from the local record (so it must be stored and announced); ``conflict`` is
    the losing version kept as a live record under its conflict name, still to
    be applied (through ``resolve``) at that path.
    """

    winner: Record
    changed: bool
    conflict: Record | None = None


def resolve(local: Record | None, remote: Record) -> Resolution:
    """Merge ``remote`` into ``local`` for one path.

    Symmetric: ``resolve(a, b)`` and ``resolve(b, a)`` give the same winner and
    conflict copy, so every node computes the same result from the same pair.
    """
    if local is None:
        return Resolution(remote, changed=True)
    order = local.version.compare(remote.version)
    if order is Order.AFTER or (order is Order.EQUAL and local == remote):
        return Resolution(local, changed=False)
    if order is Order.BEFORE:
        return Resolution(remote, changed=True)
    winner, loser, superseded = _pick(local, remote)
    merged = dataclasses.replace(winner, version=local.version.merge(remote.version))
    keep_loser = (
        not superseded
        and not loser.deleted
        and loser.kind is not Kind.DIR
        and not _same_content(winner, loser)
    )
    conflict = (
        dataclasses.replace(loser, path=conflict_name(loser.path, loser)) if keep_loser else None
    )
    return Resolution(merged, changed=merged != local, conflict=conflict)


def conflict_name(path: bytes, loser: Record) -> bytes:
    """``name.sync-conflict-YYYYMMDD-HHMMSS-<node8>.ext`` next to ``path``.

    Built only from the loser (its mtime in UTC and its author), so every node
    names the copy identically. The extension is what follows the last dot of
    the name, unless that dot starts or ends the name (``.bashrc``, ``a.``).
    """
    name = path.rsplit(b"/", 1)[-1]
    dot = name.rfind(b".")
    stem, ext = (name[:dot], name[dot:]) if 0 < dot < len(name) - 1 else (name, b"")
    when = _EPOCH + timedelta(microseconds=loser.mtime_ns // 1000)
    stamp = when.strftime("%Y%m%d-%H%M%S").encode()
    node8 = loser.modified_by[:8].encode()
    return join(parent_of(path), stem + b".sync-conflict-" + stamp + b"-" + node8 + ext)


def directory_is_live(record: Record | None, live_descendant: bool) -> bool:
    """A directory exists while its record is live or any descendant is live.

    So a directory deleted on one node while a child was added on another comes
    back with that child; ``record`` is None for a parent no record names yet.
    """
    return (record is not None and not record.deleted) or live_descendant


def _pick(a: Record, b: Record) -> tuple[Record, Record, bool]:
    """(winner, loser, whether the winner had already seen the loser's content)."""
    a_saw_b, b_saw_a = _has_seen(a, b), _has_seen(b, a)
    if a_saw_b != b_saw_a:
        return (a, b, True) if a_saw_b else (b, a, True)
    return (a, b, False) if _rank(a) > _rank(b) else (b, a, False)


def _has_seen(seer: Record, other: Record) -> bool:
    """Whether ``seer``'s vector covers the edit that produced ``other``'s content.

    That edit is ``other.modified_by``'s counter in ``other.version``: a merge
    keeps the winner's author and the other vector entries never exceed it.
    """
    counter = other.version.get(other.modified_by)
    return counter > 0 and seer.version.get(other.modified_by) >= counter


def _rank(r: Record) -> tuple[bool, bool, int, str, str]:
    """Total order for concurrent records: the larger wins the path."""
    live_dir = not r.deleted and r.kind is Kind.DIR
    return (not r.deleted, live_dir, r.mtime_ns, r.modified_by, repr(r))


def _same_content(a: Record, b: Record) -> bool:
    if a.deleted or b.deleted:
        return a.deleted and b.deleted
    if a.kind is not b.kind:
        return False
    if a.kind is Kind.FILE:
        return a.blocks == b.blocks and a.size == b.size
    if a.kind is Kind.SYMLINK:
        return a.target == b.target
    return True


class Namespace:
    """In-memory reference model of one node's records (used by the property tests).

    Applies records exactly as the database does: ``resolve`` for the path, then
    the conflict copy, itself through ``resolve`` at its own path.
    """

    def __init__(self) -> None:
        self.records: dict[bytes, Record] = {}

    def apply(self, remote: Record) -> bool:
        """Merge one record; True if anything stored changed."""
        res = resolve(self.records.get(remote.path), remote)
        if res.changed:
            self.records[remote.path] = res.winner
        conflict_changed = res.conflict is not None and self.apply(res.conflict)
        return res.changed or conflict_changed

    def visible(self) -> set[bytes]:
        """Live paths, plus every directory kept alive by a live descendant."""
        live = {path for path, r in self.records.items() if not r.deleted}
        kept: set[bytes] = set()
        for path in live:
            parent = parent_of(path)
            while parent and parent not in kept:
                kept.add(parent)
                parent = parent_of(parent)
        return live | kept
