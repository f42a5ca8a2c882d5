"""``swarmfs fsck``: exit codes, named damage and ``--repair``, offline and on a running node.

Exit 0: no damage; 1: damage found (repaired or not); 2: fsck could not run.
Damage is made by hand the way disks and bugs make it: a flipped byte in a
chunk file, a chunk file gone, a stray file, a record under a missing parent.
"""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from mounted import SwarmMount
from test_ux import ok, one_line_error, swarmfs

pytestmark = pytest.mark.mounted


def chunk_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "chunks").glob("??/??/*") if p.is_file())


def fsck(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = swarmfs("fsck", *args, data_dir=data_dir)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def flip_byte(path: Path, offset: int = 20) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.fixture
def stored(mount_factory: Callable[..., SwarmMount]) -> SwarmMount:
    """A node holding a few files (two chunks of one file, one of another), still mounted."""
    node = mount_factory()
    (node.mountpoint / "dir").mkdir()
    (node.mountpoint / "dir" / "big").write_bytes(b"\x01" * (1024 * 1024 + 10))
    (node.mountpoint / "small").write_bytes(b"small file")
    (node.mountpoint / "gone").write_bytes(b"in the trash")
    (node.mountpoint / "gone").unlink()
    return node


@pytest.mark.parametrize("online", [True, False], ids=["online", "offline"])
def test_flipped_byte_is_found_repaired_and_then_clean(stored: SwarmMount, online: bool) -> None:
    if not online:
        stored.umount()
    clean = fsck(stored.data_dir)
    assert clean.returncode == 0, clean
    assert clean.stdout == "checked 4 chunks and 5 records: no damage found\n"

    victim = chunk_files(stored.data_dir)[0]
    flip_byte(victim)
    found = fsck(stored.data_dir)
    assert found.returncode == 1, found
    assert f"chunk {victim.name}: content does not match its id\n" in found.stdout
    assert "1 problem found (run with --repair" in found.stdout
    assert victim.exists()  # without --repair nothing changes

    repaired = fsck(stored.data_dir, "--repair")
    assert repaired.returncode == 1, repaired
    assert f"chunk {victim.name}: content does not match its id (deleted" in repaired.stdout
    assert "1 problem found, 1 repaired" in repaired.stdout
    assert not victim.exists()
    assert fsck(stored.data_dir).returncode == 0


def test_a_chunk_that_fails_its_tag_is_found(stored: SwarmMount) -> None:
    """Damage the id cannot see (the block's plaintext hash, which binds the key) fails the tag."""
    stored.umount()
    chunk = chunk_files(stored.data_dir)[0]
    with sqlite3.connect(stored.data_dir / "swarmfs.db") as db:
        db.execute(
            "UPDATE blocks SET h=zeroblob(32) WHERE chunk_id=?", (bytes.fromhex(chunk.name),)
        )
    result = fsck(stored.data_dir)
    assert result.returncode == 1, result
    assert f"chunk {chunk.name}: authentication failed" in result.stdout


def test_inventory_and_stray_files(stored: SwarmMount) -> None:
    stored.umount()
    lost = chunk_files(stored.data_dir)[0]
    lost.unlink()
    stray = stored.data_dir / "chunks" / "ab" / "notachunk"
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"?")
    found = fsck(stored.data_dir)
    assert found.returncode == 1
    assert f"chunk {lost.name}: in the inventory but not on disk" in found.stdout
    assert f"stray file in the chunk store: {stray}" in found.stdout
    repaired = fsck(stored.data_dir, "--repair")
    assert "2 problems found, 2 repaired" in repaired.stdout
    assert not stray.exists()
    assert fsck(stored.data_dir).returncode == 0


def test_record_damage_names_the_path(stored: SwarmMount) -> None:
    stored.umount()
    with sqlite3.connect(stored.data_dir / "swarmfs.db") as db:
        db.execute("UPDATE records SET deleted=1 WHERE path=CAST('dir' AS BLOB)")
    result = fsck(stored.data_dir, "--repair")
    assert result.returncode == 1
    assert "record 'dir/big'" in result.stdout
    assert "its parent 'dir' is not a live directory" in result.stdout
    assert fsck(stored.data_dir).returncode == 1  # records are reported, not repaired


def test_could_not_run(tmp_path: Path) -> None:
    one_line_error(fsck(tmp_path / "missing"), "fsck could not run", "no data dir", code=2)
    (tmp_path / "empty").mkdir()
    one_line_error(fsck(tmp_path / "empty"), "fsck could not run", "swarmfs init", code=2)


def test_nothing_stored_yet(tmp_path: Path) -> None:
    ok(swarmfs("init", data_dir=tmp_path / "data"))
    result = ok(fsck(tmp_path / "data"))
    assert result.stdout == "checked 0 chunks and 1 record: no damage found\n"
