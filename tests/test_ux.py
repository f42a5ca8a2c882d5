"""``swarmfs invite`` and ``join``: tokens, config editing, and two data dirs paired by them.

The commands run as real subprocesses (their exit status, stdout and one-line
errors are the contract); the pairing test mounts two real nodes on loopback
with no key file copied by hand. ``pair`` is shared with test_trash.py.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from mounted import SwarmMount, fuse_unavailable, wait_until

from swarmfs import cli
from swarmfs.config import Address
from swarmfs.crypto.keys import encode_swarm_key, new_swarm_key, read_swarm_key
from swarmfs.errors import UserError
from swarmfs.invite import PREFIX, decode_token, encode_token, reachable

SWARMFS = Path(sys.executable).with_name("swarmfs")
CONNECT_TIMEOUT = 30.0


def swarmfs(*args: str | Path, data_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real command; never the user's own data dir."""
    env = {k: v for k, v in os.environ.items() if k != "SWARMFS_DATA_DIR"}
    extra = ["--data-dir", str(data_dir)] if data_dir is not None else []
    return subprocess.run(
        [str(SWARMFS), *map(str, args), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result
    return result


def one_line_error(
    result: subprocess.CompletedProcess[str], *fragments: str, code: int = 1
) -> None:
    assert result.returncode == code, result
    assert result.stderr.startswith("swarmfs: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def content(path: Path) -> bytes | None:
    """A file's content, or None while it is not there (yet, or any more)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def connected_ids(node: SwarmMount) -> set[str]:
    status = json.loads(ok(swarmfs("status", "--json", data_dir=node.data_dir)).stdout)
    return {peer["id"] for peer in status["peers"] if peer["connected"]}


def node_id(node: SwarmMount) -> str:
    return json.loads(ok(swarmfs("status", "--json", data_dir=node.data_dir)).stdout)["node_id"]


def pair(mount_factory: Callable[..., SwarmMount], base: Path) -> tuple[SwarmMount, SwarmMount]:
    """Node a mounted, b joined by a's token and mounted; both connected to each other."""
    a = mount_factory("a")
    token = ok(swarmfs("invite", data_dir=a.data_dir)).stdout.strip()
    ok(swarmfs("join", token, data_dir=base / "b-data"))  # the dir mount_factory("b") uses
    b = mount_factory("b")
    ids = {a: node_id(a), b: node_id(b)}
    wait_until(
        lambda: ids[b] in connected_ids(a) and ids[a] in connected_ids(b),
        CONNECT_TIMEOUT,
        "a and b to list each other as connected",
    )
    return a, b


# --- tokens ---


@pytest.mark.parametrize(
    "addresses",
    [
        [Address("127.0.0.1", 3000)],
        [Address("192.0.2.7", 1), Address("fd00::1", 65535), Address("host.example", 3000)],
    ],
)
def test_token_round_trip(addresses: list[Address]) -> None:
    key = new_swarm_key()
    token = encode_token(key, addresses)
    assert token.startswith(PREFIX)
    assert "\n" not in token and "=" not in token
    assert decode_token(f"  {token}\n") == (key, addresses)


def _corrupt(token: str) -> str:
    body = token.removeprefix(PREFIX)
    flipped = "A" if body[10] != "A" else "B"
    return PREFIX + body[:10] + flipped + body[11:]


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda t: "garbage", "not a swarmfs join token"),
        (lambda t: PREFIX, "malformed join token"),
        (lambda t: t[:-6], "malformed join token"),
        (_corrupt, "cut short or mistyped"),
        (lambda t: t + "!!", "malformed join token"),
        (
            lambda t: PREFIX + base64.urlsafe_b64encode(b"short").decode(),
            "malformed join token",
        ),
    ],
)
def test_malformed_token_is_one_line_and_touches_nothing(
    tmp_path: Path, make: Callable[[str], str], fragment: str
) -> None:
    token = encode_token(new_swarm_key(), [Address("127.0.0.1", 3000)])
    data_dir = tmp_path / "data"
    one_line_error(swarmfs("join", make(token), data_dir=data_dir), fragment)
    assert not data_dir.exists()


def test_token_without_addresses_is_refused() -> None:
    with pytest.raises(UserError, match="names no address"):
        decode_token(encode_token(new_swarm_key(), []))


def test_wildcard_listen_becomes_this_machines_addresses() -> None:
    addresses = reachable(Address("0.0.0.0", 4567))
    assert addresses[-1] == Address("127.0.0.1", 4567)
    assert all(a.port == 4567 and a.host != "0.0.0.0" for a in addresses)
    assert len(set(addresses)) == len(addresses)
    assert reachable(Address("10.1.2.3", 9)) == [Address("10.1.2.3", 9)]


# --- invite ---


def test_invite_offline_uses_the_config(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    ok(swarmfs("init", data_dir=data_dir))
    (data_dir / "config.toml").write_text('listen = "0.0.0.0:4567"\n')
    result = ok(swarmfs("invite", data_dir=data_dir))
    assert result.stdout.count("\n") == 1 and result.stdout.startswith(PREFIX)
    assert "secret" in result.stderr
    key, addresses = decode_token(result.stdout)
    assert key == read_swarm_key(data_dir / "swarm.key")
    assert Address("127.0.0.1", 4567) in addresses


def test_invite_offline_with_port_zero_says_what_to_do(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    ok(swarmfs("init", data_dir=data_dir))
    (data_dir / "config.toml").write_text('listen = "127.0.0.1:0"\n')
    one_line_error(swarmfs("invite", data_dir=data_dir), "port 0", "--listen")


def test_invite_needs_a_swarm_key(tmp_path: Path) -> None:
    one_line_error(swarmfs("invite", data_dir=tmp_path / "none"), "no swarm key", "swarmfs init")


# --- join ---


def test_join_initialises_a_new_data_dir(tmp_path: Path) -> None:
    key = new_swarm_key()
    data_dir = tmp_path / "data"
    token = encode_token(key, [Address("127.0.0.1", 3001)])
    result = ok(swarmfs("join", token, data_dir=data_dir))
    assert "127.0.0.1:3001" in result.stdout
    assert f"swarmfs mount MOUNTPOINT --data-dir {data_dir}" in result.stdout
    assert read_swarm_key(data_dir / "swarm.key") == key
    assert stat.S_IMODE((data_dir / "swarm.key").stat().st_mode) == 0o600
    assert (data_dir / "node.key").exists()
    config = tomllib.loads((data_dir / "config.toml").read_text())
    assert config == {"bootstrap": ["127.0.0.1:3001"]}


def test_join_keeps_other_keys_and_known_peers(tmp_path: Path) -> None:
    key = new_swarm_key()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "swarm.key").write_bytes(encode_swarm_key(key))
    (data_dir / "config.toml").write_text(
        '# my node\nreplicas = 2\nbootstrap = [\n  "old.example:3000",  # the first\n]\n'
        'cache_size = "1G"\n'
    )
    token = encode_token(key, [Address("127.0.0.1", 3001), Address("old.example", 3000)])
    ok(swarmfs("join", token, data_dir=data_dir))
    text = (data_dir / "config.toml").read_text()
    assert text.startswith("# my node\n")
    assert tomllib.loads(text) == {
        "replicas": 2,
        "cache_size": "1G",
        "bootstrap": ["127.0.0.1:3001", "old.example:3000"],
    }
    ok(swarmfs("join", token, data_dir=data_dir))  # again: nothing doubles
    assert tomllib.loads((data_dir / "config.toml").read_text())["bootstrap"] == [
        "127.0.0.1:3001",
        "old.example:3000",
    ]


def test_join_refuses_a_data_dir_of_another_swarm(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    ok(swarmfs("init", data_dir=data_dir))
    before = (data_dir / "swarm.key").read_bytes()
    token = encode_token(new_swarm_key(), [Address("127.0.0.1", 3001)])
    one_line_error(swarmfs("join", token, data_dir=data_dir), "another swarm")
    assert (data_dir / "swarm.key").read_bytes() == before
    assert not (data_dir / "config.toml").exists()


@pytest.mark.mounted
def test_invite_and_join_pair_two_nodes(
    mount_factory: Callable[..., SwarmMount], tmp_path: Path
) -> None:
    a, b = pair(mount_factory, tmp_path)
    assert (a.data_dir / "swarm.key").read_bytes() == (b.data_dir / "swarm.key").read_bytes()
    (a.mountpoint / "greeting").write_bytes(b"hello b\n")
    wait_until(
        lambda: content(b.mountpoint / "greeting") == b"hello b\n", CONNECT_TIMEOUT, "a's file on b"
    )


# --- contrib/ ---

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"


def complete(*words: str) -> list[str]:
    """What contrib/swarmfs.bash offers for the last of ``words``."""
    script = (
        f"source {CONTRIB / 'swarmfs.bash'}\n"
        'COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _swarmfs; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    result = ok(
        subprocess.run(["bash", "-c", script, "bash", *words], capture_output=True, text=True)
    )
    return [line for line in result.stdout.splitlines() if line]


def test_bash_completion_matches_the_parser() -> None:
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) <= set(complete("swarmfs", ""))
    for name, sub in commands.choices.items():
        flags = {
            flag
            for action in sub._actions
            if action.help != argparse.SUPPRESS
            for flag in action.option_strings
        }
        assert set(complete("swarmfs", name, "-")) == flags, name
    assert complete("swarmfs", "trash", "") == ["list", "restore"]
    assert complete("swarmfs", "mount", "-o", "noatime,nos") == ["noatime,nosuid"]


def test_mount_helper_turns_fstab_options_into_flags(tmp_path: Path) -> None:
    """mount(8) runs the helper as ``mount.fuse.swarmfs SOURCE DIR -o OPTS``; -f is a dry run."""
    helper = [str(CONTRIB / "mount.fuse.swarmfs"), str(tmp_path / "data"), str(tmp_path / "mnt")]
    fake = ["-f", "-o", "rw,_netdev,noatime,listen=127.0.0.1:0,replicas=2,nodev"]
    assert subprocess.run([*helper, *fake], check=False).returncode == 0
    bad = subprocess.run([*helper, "-o", "noatime,bogus"], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr == "mount.fuse.swarmfs: unsupported option 'bogus'\n"


@pytest.mark.mounted
def test_mount_helper_mounts(tmp_path: Path) -> None:
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(f"FUSE unavailable: {reason}")
    node = SwarmMount(tmp_path, "fstab")
    helper = [CONTRIB / "mount.fuse.swarmfs", node.data_dir, node.mountpoint]
    options = ["-n", "-o", "rw,noatime,listen=127.0.0.1:0"]
    env = dict(os.environ, SWARMFS=str(SWARMFS))
    try:
        ok(subprocess.run([*helper, *options], capture_output=True, text=True, env=env))
        assert node.answers()
        (node.mountpoint / "f").write_bytes(b"via fstab")
        node.pid = wait_until(node._read_pid, 10, "the node's pid file")
        node.umount()
    finally:
        node.cleanup()
    assert node.log_problems() == []
