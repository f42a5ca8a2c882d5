"""The command line, config, data dir and control socket (DESIGN.md §1).

Where the CLI is what is tested, it runs as a real ``swarmfs`` subprocess, as a
user would run it: exit status and the one-line message are the contract.
Nothing here binds a fixed port; nodes listen on 127.0.0.1:0.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from swarmfs import cli, control
from swarmfs.config import (
    DEFAULT_LISTEN,
    Address,
    Config,
    GiB,
    default_data_dir,
    load_config,
    parse_fuse_options,
    parse_size,
)
from swarmfs.crypto.keys import encode_swarm_key, new_swarm_key
from swarmfs.datadir import DataDir
from swarmfs.errors import UserError

SWARMFS = Path(sys.executable).with_name("swarmfs")
TIMEOUT = 60.0
STATUS_FIELDS = {
    "running",
    "pid",
    "node_id",
    "listen",
    "peers",
    "files",
    "bytes_stored",
    "bytes_cached",
    "cache_limit",
    "backlog",
}


def swarmfs(*args: str | Path, data_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real command; a test never touches the user's own data dir."""
    env = {k: v for k, v in os.environ.items() if k != "SWARMFS_DATA_DIR"}
    extra = ["--data-dir", str(data_dir)] if data_dir is not None else []
    return subprocess.run(
        [str(SWARMFS), *map(str, args), *extra],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("swarmfs: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def mountpoint(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


def write_key_file(path: Path, key: bytes | None = None) -> bytes:
    key = key or new_swarm_key()
    path.write_bytes(encode_swarm_key(key))
    return key


# --- config ---


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("10G", 10 * GiB),
        ("512M", 512 * 1024**2),
        ("1GiB", GiB),
        ("1gib", GiB),
        ("2 MiB", 2 * 1024**2),
        ("5GB", 5 * 10**9),
        ("1.5K", 1536),
        ("4096", 4096),
        (4096, 4096),
        ("0", 0),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "10X", "-1", "1.5.2G", "10i", True, 1.5, -3])
def test_parse_size_refuses(text: object) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(text)


def test_defaults(data_dir: Path) -> None:
    config = load_config(data_dir)
    assert config == Config(data_dir=data_dir)
    assert config.listen == Address("0.0.0.0", 3000) == DEFAULT_LISTEN
    assert str(config.listen) == "0.0.0.0:3000"
    assert config.bootstrap == ()
    assert config.replicas == 3
    assert config.cache_size == 10 * GiB
    assert config.trash_retention == 7 * 24 * 3600
    assert config.fuse_options == frozenset()
    assert config.log_level == logging.INFO


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SWARMFS_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("SWARMFS_DATA_DIR")
    assert default_data_dir().name == "swarmfs"


TOML = """
listen = "127.0.0.1:4000"
bootstrap = ["a.example:3000", "[fd00::1]:3001"]
swarm_key_file = "keys/swarm.key"
replicas = "all"
cache_size = "512M"
fuse_options = ["ro", "noatime"]
trash_retention = "2d"
log_level = "debug"
"""


def test_config_toml_sets_every_option(data_dir: Path) -> None:
    data_dir.mkdir()
    (data_dir / "config.toml").write_text(TOML)
    config = load_config(data_dir)
    assert config.listen == Address("127.0.0.1", 4000)
    assert config.bootstrap == (Address("a.example", 3000), Address("fd00::1", 3001))
    assert str(config.bootstrap[1]) == "[fd00::1]:3001"
    assert config.swarm_key_file == data_dir / "keys/swarm.key"  # relative to the data dir
    assert config.replicas is None
    assert config.cache_size == 512 * 1024**2
    assert config.fuse_options == {"ro", "noatime"}
    assert config.trash_retention == 2 * 24 * 3600
    assert config.log_level == logging.DEBUG


def test_command_line_wins_over_toml(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir.mkdir()
    (data_dir / "config.toml").write_text(TOML)
    monkeypatch.chdir(tmp_path)
    argv = ["mount", "mnt", "--listen", "0.0.0.0:5000", "--bootstrap", "c:3", "--replicas", "2"]
    argv += ["--cache-size", "1GiB", "-o", "nodev", "-o", "nosuid", "--swarm-key-file", "k"]
    args = cli.build_parser().parse_args([*argv, "-q"])
    config = cli.config_from_args(args, DataDir(data_dir))
    assert config.listen == Address("0.0.0.0", 5000)
    assert config.bootstrap == (Address("c", 3),)  # replaces the file's list
    assert config.replicas == 2
    assert config.cache_size == GiB
    assert config.fuse_options == {"nodev", "nosuid"}
    assert config.swarm_key_file == tmp_path / "k"  # relative to the working directory
    assert config.log_level == logging.WARNING
    # Not given on the command line: the file's values stay.
    args = cli.build_parser().parse_args(["node"])
    config = cli.config_from_args(args, DataDir(data_dir))
    assert config.listen == Address("127.0.0.1", 4000)
    assert config.log_level == logging.DEBUG


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ("colour = 1", "unknown key 'colour'"),
        ('cache_size = "lots"', "cache_size: expected a size"),
        ("replicas = 0", "replicas: expected a positive number"),
        ('listen = "nohost"', "listen: expected HOST:PORT"),
        ('bootstrap = ["h:0"]', "bootstrap: port out of range"),
        ('fuse_options = ["ro", "uid=0"]', "unsupported mount option 'uid=0'"),
        ("listen = ", "invalid TOML"),
    ],
)
def test_bad_config_toml_names_the_key(data_dir: Path, toml: str, fragment: str) -> None:
    data_dir.mkdir()
    (data_dir / "config.toml").write_text(toml)
    with pytest.raises(UserError, match=fragment) as info:
        load_config(data_dir)
    assert "\n" not in str(info.value)


def test_fuse_options_accepts_the_documented_set() -> None:
    documented = "allow_other,default_permissions,ro,noatime,nosuid,nodev"
    assert parse_fuse_options(documented) == set(documented.split(","))


def test_unsupported_mount_option_is_refused(data_dir: Path, mountpoint: Path) -> None:
    result = swarmfs("mount", mountpoint, "-o", "ro,max_write=4096", data_dir=data_dir)
    assert_one_line_error(result, "-o: unsupported mount option 'max_write=4096'", "allow_other")
    assert not data_dir.exists()  # refused before anything was created or started


# --- init and the swarm key ---


def test_init_creates_identity_and_key(data_dir: Path) -> None:
    result = swarmfs("init", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    dd = DataDir(data_dir)
    assert dd.identity().node_id in result.stdout
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    for secret in (dd.swarm_key_file, dd.node_key_file):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    key, node_id = dd.swarm_key(), dd.identity().node_id
    again = swarmfs("init", data_dir=data_dir)
    assert again.returncode == 0
    assert "already initialised" in again.stdout
    assert (dd.swarm_key(), dd.identity().node_id) == (key, node_id)


def test_init_adopts_a_given_key(data_dir: Path, tmp_path: Path) -> None:
    key = write_key_file(tmp_path / "shared.key")
    assert (
        swarmfs("init", "--swarm-key-file", tmp_path / "shared.key", data_dir=data_dir).returncode
        == 0
    )
    assert DataDir(data_dir).swarm_key() == key


def test_init_accepts_the_same_key_and_refuses_another(data_dir: Path, tmp_path: Path) -> None:
    assert swarmfs("init", data_dir=data_dir).returncode == 0
    dd = DataDir(data_dir)
    write_key_file(tmp_path / "same.key", dd.swarm_key())
    assert (
        swarmfs("init", "--swarm-key-file", tmp_path / "same.key", data_dir=data_dir).returncode
        == 0
    )
    write_key_file(tmp_path / "other.key")
    result = swarmfs("init", "--swarm-key-file", tmp_path / "other.key", data_dir=data_dir)
    assert_one_line_error(result, "other.key", "different swarm key")


@pytest.mark.parametrize("content", [None, b"not a key\n"])
def test_unusable_key_file_is_refused(
    data_dir: Path, tmp_path: Path, content: bytes | None
) -> None:
    key_file = tmp_path / "bad.key"
    if content is not None:
        key_file.write_bytes(content)
    result = swarmfs("init", "--swarm-key-file", key_file, data_dir=data_dir)
    assert_one_line_error(result, str(key_file))
    assert not DataDir(data_dir).swarm_key_file.exists()


def test_mount_refuses_an_unreadable_key_file(
    data_dir: Path, mountpoint: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.key"
    result = swarmfs("mount", mountpoint, "--swarm-key-file", missing, data_dir=data_dir)
    assert_one_line_error(result, f"cannot read swarm key {missing}")
    assert cli.find_mount(mountpoint) is None


# --- the lock and the pid file ---


@pytest.fixture
def lock_holder(data_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the data dir's lock until the test ends."""
    code = (
        "import sys; from pathlib import Path; from swarmfs.datadir import DataDir\n"
        "lock = DataDir(Path(sys.argv[1])).acquire_lock()\n"
        "print('locked', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        yield holder
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=TIMEOUT)


def test_second_node_fails_at_once(data_dir: Path, lock_holder: subprocess.Popen[str]) -> None:
    result = swarmfs("node", "--listen", "127.0.0.1:0", data_dir=data_dir)
    assert_one_line_error(result, f"data dir {data_dir} is in use by pid {lock_holder.pid}")


def test_mount_reports_lock_through_the_launcher(
    data_dir: Path, mountpoint: Path, lock_holder: subprocess.Popen[str]
) -> None:
    """The detached child's start-up error reaches the caller's stderr, exit 1."""
    result = swarmfs("mount", mountpoint, "--listen", "127.0.0.1:0", data_dir=data_dir)
    assert_one_line_error(result, f"is in use by pid {lock_holder.pid}")
    assert f"is in use by pid {lock_holder.pid}" in DataDir(data_dir).log_file.read_text()


def test_lock_is_released_when_its_holder_exits(data_dir: Path) -> None:
    dd = DataDir(data_dir)
    assert not dd.is_locked()
    with dd.acquire_lock():
        assert dd.is_locked()
        assert dd.lock_holder() == os.getpid()
        with pytest.raises(UserError, match=f"in use by pid {os.getpid()}"):
            dd.acquire_lock()
    assert not dd.is_locked()
    assert dd.lock_holder() is None
    assert dd.wait_released(0.0)


def test_pid_file_is_trusted_only_while_locked(data_dir: Path) -> None:
    dd = DataDir(data_dir)
    with dd.acquire_lock():
        dd.write_pid()
        assert dd.read_pid() == os.getpid()
    assert dd.read_pid() is None  # left behind, as by a crash: not a running node
    dd.remove_pid()
    assert not dd.pid_file.exists()


def test_remove_pid_leaves_another_nodes_file(data_dir: Path) -> None:
    dd = DataDir(data_dir)
    dd.create()
    dd.pid_file.write_text("1\n")
    dd.remove_pid()
    assert dd.pid_file.read_text() == "1\n"


def test_wait_released_waits_for_the_holder_to_exit(
    data_dir: Path, lock_holder: subprocess.Popen[str]
) -> None:
    dd = DataDir(data_dir)
    assert not dd.wait_released(0.05)
    lock_holder.send_signal(signal.SIGTERM)
    assert dd.wait_released(TIMEOUT)
    assert not dd.is_locked()


# --- the control socket ---


@pytest.fixture
def long_data_dir(tmp_path: Path) -> DataDir:
    """A data dir whose socket path is far beyond sun_path's 108 bytes."""
    path = tmp_path / ("d" * 200)
    assert len(str(path / "control.sock").encode()) > 200
    dd = DataDir(path)
    dd.create()
    return dd


async def _status(request: dict[str, Any]) -> dict[str, Any]:
    return {"running": True, "echo": request}


async def _broken(request: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("handler bug")


HANDLERS: dict[str, control.Handler] = {"status": _status, "broken": _broken}


async def call(dd: DataDir, payload: dict[str, Any]) -> dict[str, Any]:
    return await trio.to_thread.run_sync(control.request, dd, payload, 10.0)


async def test_control_round_trip_on_a_long_path(
    long_data_dir: DataDir, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve, long_data_dir, HANDLERS)
            sock_mode = long_data_dir.control_socket.stat().st_mode
            assert stat.S_ISSOCK(sock_mode)
            assert stat.S_IMODE(sock_mode) == 0o600
            reply = await call(long_data_dir, {"cmd": "status", "x": [1, "y"]})
            assert reply == {"running": True, "echo": {"cmd": "status", "x": [1, "y"]}}
            with pytest.raises(control.ControlError, match="unknown command 'nope'"):
                await call(long_data_dir, {"cmd": "nope"})
            with pytest.raises(control.ControlError, match="handler bug"):
                await call(long_data_dir, {"cmd": "broken"})
            assert "Traceback" in caplog.text or caplog.records[-1].exc_info
            # The failure cost nothing: the node still answers.
            assert (await call(long_data_dir, {"cmd": "status"}))["running"] is True
            nursery.cancel_scope.cancel()
    assert not long_data_dir.control_socket.exists()
    with pytest.raises(control.NodeNotRunning):
        control.request(long_data_dir, {"cmd": "status"})


def _raw_exchange(dd: DataDir, data: bytes, replies: int) -> list[dict[str, Any]]:
    dirfd = os.open(dd.path, os.O_PATH | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(f"/proc/self/fd/{dirfd}/control.sock")
            sock.sendall(data)
            buffer = b""
            while buffer.count(b"\n") < replies:
                chunk = sock.recv(4096)
                assert chunk, "connection closed early"
                buffer += chunk
    finally:
        os.close(dirfd)
    return [json.loads(line) for line in buffer.splitlines()]


async def test_control_answers_each_line_in_order(long_data_dir: DataDir) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve, long_data_dir, HANDLERS)
            data = b'{"cmd": "status"}\nnot json\n[1]\n{"cmd": 3}\n{"cmd": "status", "n": 2}\n'
            replies = await trio.to_thread.run_sync(_raw_exchange, long_data_dir, data, 5)
            assert replies[0]["running"] is True
            assert replies[1]["error"].startswith("invalid request")
            assert replies[2]["error"].startswith("invalid request")
            assert replies[3]["error"].startswith("invalid request")
            assert replies[4]["echo"]["n"] == 2
            nursery.cancel_scope.cancel()


async def test_control_survives_oversized_and_abandoned_requests(long_data_dir: DataDir) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve, long_data_dir, HANDLERS)
            flood = b"x" * (control.MAX_LINE + 2)
            (reply,) = await trio.to_thread.run_sync(_raw_exchange, long_data_dir, flood, 1)
            assert reply == {"error": "request too long"}
            # A client that sends half a request and leaves costs nothing either.
            await trio.to_thread.run_sync(_raw_exchange, long_data_dir, b'{"cmd": ', 0)
            assert (await call(long_data_dir, {"cmd": "status"}))["running"] is True
            nursery.cancel_scope.cancel()


async def test_control_replaces_a_stale_socket(long_data_dir: DataDir) -> None:
    dirfd = os.open(long_data_dir.path, os.O_PATH | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX) as stale:
            stale.bind(f"/proc/self/fd/{dirfd}/control.sock")  # left behind, as by a crash
    finally:
        os.close(dirfd)
    with pytest.raises(control.NodeNotRunning, match="no swarmfs node is running"):
        control.request(long_data_dir, {"cmd": "status"})
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve, long_data_dir, HANDLERS)
            assert (await call(long_data_dir, {"cmd": "status"}))["running"] is True
            nursery.cancel_scope.cancel()


def test_request_without_data_dir_says_no_node(tmp_path: Path) -> None:
    with pytest.raises(control.NodeNotRunning, match="no swarmfs node is running"):
        control.request(DataDir(tmp_path / "absent"), {"cmd": "status"})


# --- mount's checks ---


@pytest.mark.parametrize("foreground", [False, True])
def test_mountpoint_errors(data_dir: Path, tmp_path: Path, foreground: bool) -> None:
    flags = ["--listen", "127.0.0.1:0", *(["--foreground"] if foreground else [])]
    missing = tmp_path / "missing"
    assert_one_line_error(
        swarmfs("mount", missing, *flags, data_dir=data_dir),
        f"mountpoint {missing} does not exist",
    )
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_one_line_error(
        swarmfs("mount", a_file, *flags, data_dir=data_dir),
        f"mountpoint {a_file} is not a directory",
    )
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    assert_one_line_error(
        swarmfs("mount", full, *flags, data_dir=data_dir), f"mountpoint {full} is not empty"
    )
    assert not DataDir(data_dir).is_locked()


def test_umount_of_something_not_mounted(data_dir: Path, mountpoint: Path) -> None:
    assert_one_line_error(swarmfs("umount", mountpoint, data_dir=data_dir), "is not mounted")
    assert_one_line_error(swarmfs("umount", "/proc", data_dir=data_dir), "not a swarmfs mount")


def test_mountinfo_is_parsed() -> None:
    proc = cli.find_mount(Path("/proc"))
    assert proc is not None and proc.fstype == "proc"
    assert cli.find_mount(Path("/no/such/mountpoint")) is None


# --- status ---


def test_status_json_offline(data_dir: Path) -> None:
    assert swarmfs("init", data_dir=data_dir).returncode == 0
    result = swarmfs("status", "--json", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status.keys() >= STATUS_FIELDS
    assert status["running"] is False
    assert status["pid"] is None
    assert status["node_id"] == DataDir(data_dir).identity().node_id
    assert status["listen"] == "0.0.0.0:3000"
    assert status["peers"] == []
    assert status["cache_limit"] == 10 * GiB
    assert set(status["backlog"]) == {"chunks", "bytes", "records"}
    human = swarmfs("status", data_dir=data_dir)
    assert human.returncode == 0, human.stderr
    assert status["node_id"] in human.stdout
    assert "not running" in human.stdout


def test_detached_logging_is_rotated(tmp_path: Path) -> None:
    log_file = tmp_path / "swarmfs.log"
    code = (
        "import logging, sys; from pathlib import Path\n"
        "from swarmfs.logsetup import setup_logging\n"
        "setup_logging(logging.INFO, Path(sys.argv[1]))\n"
        "logging.getLogger('swarmfs.test').debug('hidden')\n"
        "logging.getLogger('swarmfs.test').info('shown')\n"
        "handler, = logging.getLogger().handlers\n"
        "print(handler.maxBytes, handler.backupCount)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(log_file)], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == [str(10 * 1024 * 1024), "3"]
    (line,) = log_file.read_text().splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO    swarmfs.test: shown", line)


def test_human_bytes() -> None:
    assert cli.human_bytes(0) == "0 B"
    assert cli.human_bytes(1023) == "1023 B"
    assert cli.human_bytes(1536) == "1.5 KiB"
    assert cli.human_bytes(10 * GiB) == "10.0 GiB"


# --- a real node: the launcher, umount and a crashed node's mount ---


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def is_running(pid: int) -> bool:
    """Whether ``pid`` still runs; a zombie (exited, not yet reaped by init) does not."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def is_dead(path: Path) -> bool:
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


@pytest.mark.mounted
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse does not exist")
def test_mount_status_umount_and_crash_recovery(data_dir: Path, mountpoint: Path) -> None:
    dd = DataDir(data_dir)
    listen = ["--listen", "127.0.0.1:0"]
    try:
        assert swarmfs("mount", mountpoint, *listen, data_dir=data_dir).returncode == 0
        # Ready means ready: the mount, the lock and the control socket, with no waiting.
        assert (mountpoint / "hello").write_text("hi") == 2
        pid = dd.read_pid()
        assert pid is not None and dd.lock_holder() == pid
        status = json.loads(swarmfs("status", "--json", data_dir=data_dir).stdout)
        assert (status["running"], status["pid"]) == (True, pid)
        assert_one_line_error(
            swarmfs("mount", mountpoint, *listen, data_dir=data_dir), "already mounted"
        )

        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not dd.is_locked(), "the killed node's lock to drop")
        assert is_dead(mountpoint)
        result = swarmfs("mount", mountpoint, *listen, data_dir=data_dir)
        assert result.returncode == 0, result.stderr
        assert (mountpoint / "hello").read_text() == "hi"
        assert "left dead by a crashed node" in dd.log_file.read_text()

        pid = dd.read_pid()
        result = swarmfs("umount", mountpoint, "--wait", "1")
        assert result.returncode == 0, result.stderr
        # umount returns only once the node has exited and released the lock.
        assert not dd.is_locked()
        assert dd.read_pid() is None and not dd.pid_file.exists()
        assert pid is not None and not is_running(pid)
        assert cli.find_mount(mountpoint) is None
    finally:
        if cli.find_mount(mountpoint) is not None:
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)
