"""The ``swarmfs`` command line (DESIGN.md §1).

``main`` parses, runs one command and turns a ``UserError`` into one line on
stderr with exit status 1; anything else is a bug and keeps its traceback.

``mount`` without ``--foreground`` is a launcher: it starts the same command
with ``--foreground --ready-fd N`` as a detached child (new session, stdin
/dev/null, output appended to the log) and waits on a pipe for one line,
``ok`` or ``error: MESSAGE``, so every start-up error, from a non-empty
mountpoint to a port in use, reaches the caller's terminal. The child checks
everything itself, because ``mount --foreground`` needs the same checks.

Mounts are found in ``/proc/self/mountinfo`` by their type ``fuse.swarmfs``
and their source (the FUSE fsname) ``swarmfs:DIR``, which names the data dir
of the node serving them.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import re
import select
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn
from rich.progress_bar import ProgressBar
from rich.table import Table

from swarmfs import __version__, control
from swarmfs.config import DATA_DIR_ENV, OPTIONS, Config, default_data_dir, load_config
from swarmfs.datadir import DataDir
from swarmfs.errors import UserError
from swarmfs.logsetup import setup_logging

log = logging.getLogger(__name__)

FSTYPE = "fuse.swarmfs"
FSNAME_PREFIX = "swarmfs:"
EXIT_FSCK_FAILED = 2
"""``fsck`` could not run (1 means it ran and found damage)."""
FSCK_TIMEOUT = 24 * 3600.0
"""Seconds a running node may take to check every chunk before ``fsck`` gives up."""
START_TIMEOUT = 60.0
"""Seconds a launcher waits for its node to mount, bind and answer before giving up."""
STATUS_TIMEOUT = 5.0
SHUTDOWN_GRACE = 30.0
"""Seconds a node may take, beyond ``--wait``, to commit, unmount and exit."""
PROGRESS_INTERVAL = 0.5
"""Seconds between screen refreshes of ``umount``'s progress and ``status --watch``."""
WATCH_INTERVAL = 1.0

Command = Callable[[argparse.Namespace], int]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    # Short commands log only problems unless -v; mount and node set up their own logging.
    setup_logging(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return args.run(args)
    except UserError as exc:
        print(f"swarmfs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help=f"the node's data dir (default: {default_data_dir()}, from ${DATA_DIR_ENV}"
        " or else the user data dir)",
    )
    verbosity = common.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="log only problems")

    node_options = argparse.ArgumentParser(add_help=False)
    for option in OPTIONS:
        if option.flags:
            node_options.add_argument(
                *option.flags,
                dest=option.key,
                metavar=option.metavar,
                help=option.help,
                action="append" if option.repeat else "store",
            )

    parser = argparse.ArgumentParser(
        prog="swarmfs",
        description="A peer-to-peer, end-to-end encrypted, replicated filesystem.",
    )
    parser.add_argument("--version", action="version", version=f"swarmfs {__version__}")
    commands = parser.add_subparsers(metavar="COMMAND", required=True)

    def add(name: str, run: Command, help: str, *parents: argparse.ArgumentParser) -> Any:
        sub = commands.add_parser(name, parents=[common, *parents], help=help, description=help)
        sub.set_defaults(run=run, command=name)
        return sub

    sub = add("init", cmd_init, "create the node identity and, unless given, a swarm key")
    sub.add_argument("--swarm-key-file", type=Path, metavar="FILE", help="join this swarm's key")

    sub = add("mount", cmd_mount, "mount the swarm and run a node in the background", node_options)
    sub.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    sub.add_argument("--foreground", action="store_true", help="stay attached, log to stderr")
    sub.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    add("node", cmd_node, "run a headless peer in the foreground", node_options)

    sub = add("umount", cmd_umount, "flush, finish replication and unmount")
    sub.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    sub.add_argument(
        "--wait",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for new chunks to reach a peer (default 10)",
    )

    sub = add("status", cmd_status, "peers, replication backlog, cache use")
    sub.add_argument("--json", action="store_true", help="print one JSON object")
    sub.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")

    add("invite", cmd_invite, "print a join token for this swarm")
    sub = add("join", cmd_join, "store a join token's key and peers in the data dir")
    sub.add_argument("token", metavar="TOKEN")
    sub = add("fsck", cmd_fsck, "verify every chunk and record")
    sub.add_argument("--repair", action="store_true", help="repair what can be repaired")
    sub = add("trash", cmd_trash, "list or restore deleted files")
    # A positional, not nested subparsers: those would reset --data-dir given before them.
    sub.add_argument("action", choices=("list", "restore"))
    sub.add_argument("path", nargs="?", help="for restore: a/b, /a/b or MOUNTPOINT/a/b")
    sub = add("demo", cmd_demo, "run a 3-node swarm on loopback")
    sub.add_argument("--exit", action="store_true", help="tear the swarm down at the end")
    return parser


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}")
    return seconds


def _data_dir(args: argparse.Namespace) -> DataDir:
    return DataDir(args.data_dir or default_data_dir())


def config_from_args(args: argparse.Namespace, data_dir: DataDir) -> Config:
    overrides: dict[str, object] = {o.key: getattr(args, o.key, None) for o in OPTIONS if o.flags}
    overrides["log_level"] = "debug" if args.verbose else "warning" if args.quiet else None
    return load_config(data_dir.path, overrides)


# --- init ---


def cmd_init(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    existed = data_dir.is_initialised()
    data_dir.init(args.swarm_key_file)
    state = "already initialised" if existed else "initialised"
    print(f"{data_dir.path}: {state}, node id {data_dir.identity().node_id}")
    return 0


# --- mount and node ---


def cmd_mount(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    # Parsed here too, so a bad option fails before any process starts.
    config = config_from_args(args, data_dir)
    mountpoint = Path(os.path.realpath(args.mountpoint))
    if args.foreground:
        return _run_foreground(config, data_dir, mountpoint, args.ready_fd)
    return _launch(args.argv, data_dir)


def cmd_node(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    return _run_foreground(config_from_args(args, data_dir), data_dir, None, None)


def _launch(argv: list[str], data_dir: DataDir) -> int:
    """Start ``argv`` with ``--foreground`` detached and relay its readiness line."""
    data_dir.create()
    try:
        log_file = data_dir.log_file.open("ab")
    except OSError as exc:
        raise UserError(f"cannot write {data_dir.log_file}: {exc.strerror}") from None
    read_end, write_end = os.pipe()
    # Right after the command name, so a "--" in argv cannot swallow them.
    flags = ["--foreground", f"--ready-fd={write_end}"]
    try:
        with log_file:
            child = subprocess.Popen(
                [sys.executable, "-m", "swarmfs", argv[0], *flags, *argv[1:]],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                pass_fds=(write_end,),
                start_new_session=True,
            )
        os.close(write_end)
        line = _read_line(read_end, START_TIMEOUT)
    finally:
        os.close(read_end)
        with contextlib.suppress(OSError):
            os.close(write_end)
    if line == "ok":
        return 0
    if line is None:
        child.terminate()
        raise UserError(
            f"the node did not start within {START_TIMEOUT:g} s and was stopped;"
            f" see {data_dir.log_file}"
        )
    if line.startswith("error: "):
        raise UserError(line.removeprefix("error: "))
    raise UserError(f"the node exited during start-up; see {data_dir.log_file}")


def _read_line(fd: int, timeout: float) -> str | None:
    """The first line written to ``fd`` ("" at EOF without one); None on timeout."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.partition(b"\n")[0].decode(errors="replace")


class _ReadyPipe:
    """The launcher's pipe: gets one line, ``ok`` or ``error: MESSAGE``, then is closed."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        if fd is not None:
            os.set_inheritable(fd, False)  # fusermount3 and friends must not hold it open

    def send(self, line: str) -> None:
        if self._fd is None:
            return
        # The launcher may be gone (Ctrl-C); the node runs on regardless.
        with contextlib.suppress(OSError):
            os.write(self._fd, line.encode() + b"\n")
        os.close(self._fd)
        self._fd = None


def _run_foreground(
    config: Config, data_dir: DataDir, mountpoint: Path | None, ready_fd: int | None
) -> int:
    ready = _ReadyPipe(ready_fd)
    try:
        setup_logging(config.log_level, data_dir.log_file if ready_fd is not None else None)
        if mountpoint is not None:
            _check_mountpoint(mountpoint)
            _check_dev_fuse()
        with data_dir.acquire_lock():
            data_dir.init(config.swarm_key_file)
            data_dir.write_pid()
            try:
                if ready_fd is not None:
                    os.chdir("/")  # a daemon must not pin the directory it was started in
                _run_node(config, data_dir, mountpoint, ready)
            finally:
                data_dir.remove_pid()
    except UserError as exc:
        ready.send(f"error: {exc}")
        raise
    return 0


def _run_node(
    config: Config, data_dir: DataDir, mountpoint: Path | None, ready: _ReadyPipe
) -> None:
    # Imported here: the node pulls in pyfuse3 and every layer, which the
    # short commands (init, status, umount) do not need to load.
    from swarmfs.memory import tune_malloc
    from swarmfs.node import run_node

    tune_malloc()

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_node, config, data_dir, mountpoint))
            ready.send("ok")

    try:
        trio.run(serve)
    except BaseExceptionGroup as group:
        raise _sole_exception(group) from None


def _sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Unwrap nurseries' single-member groups, so a UserError stays a one-line error."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _check_dev_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        raise UserError("/dev/fuse is missing: FUSE is not available on this machine")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise UserError("/dev/fuse is not accessible to this user")


def _check_mountpoint(mountpoint: Path) -> None:
    mount = find_mount(mountpoint)
    if mount is not None and mount.fstype == FSTYPE:
        node_dir = _node_data_dir(mount)
        holder = node_dir.lock_holder() if node_dir else None
        if holder is not None or not _is_dead(mountpoint):
            by = f" by pid {holder}" if holder is not None else ""
            raise UserError(f"{mountpoint} is already mounted{by} ({mount.source})")
        _lazy_unmount(mountpoint)
        log.warning("cleared %s, left dead by a crashed node (%s)", mountpoint, mount.source)
    try:
        mode = os.stat(mountpoint).st_mode
        if not stat.S_ISDIR(mode):
            raise UserError(f"mountpoint {mountpoint} is not a directory")
        with os.scandir(mountpoint) as entries:
            if any(True for _ in entries):
                raise UserError(f"mountpoint {mountpoint} is not empty")
    except FileNotFoundError:
        raise UserError(f"mountpoint {mountpoint} does not exist") from None
    except OSError as exc:
        raise UserError(f"cannot use mountpoint {mountpoint}: {exc.strerror}") from None


def _node_data_dir(mount: Mount) -> DataDir | None:
    """The data dir named by a swarmfs mount's fsname ``swarmfs:DIR``."""
    if not mount.source.startswith(FSNAME_PREFIX):
        return None
    return DataDir(Path(mount.source.removeprefix(FSNAME_PREFIX)))


def _is_dead(mountpoint: Path) -> bool:
    """Whether the FUSE connection behind ``mountpoint`` is gone (its node died).

    ``statvfs`` always reaches the daemon; ``stat`` may be answered from the
    kernel's attribute cache and succeed on a dead mount. Only call this when
    no live node holds the data dir, or a stopped node would hang the probe.
    """
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def _lazy_unmount(mountpoint: Path) -> None:
    try:
        result = subprocess.run(
            ["fusermount3", "-uz", str(mountpoint)], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise UserError("fusermount3 is missing (install the fuse3 package)") from None
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
        raise UserError(f"cannot unmount {mountpoint}: {reason[0]}")


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo, the parts swarmfs needs."""

    mountpoint: Path
    fstype: str
    source: str


_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> str:
    return os.fsdecode(_OCTAL_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), field))


def mounts() -> Iterator[Mount]:
    """This process's mounts, in mount order (a later one hides an earlier one)."""
    for line in Path("/proc/self/mountinfo").read_bytes().splitlines():
        fields = line.split(b" ")
        separator = fields.index(b"-", 6)
        yield Mount(
            Path(_unescape(fields[4])),
            _unescape(fields[separator + 1]),
            _unescape(fields[separator + 2]),
        )


def find_mount(mountpoint: Path) -> Mount | None:
    """The topmost mount at ``mountpoint`` (a resolved path), if any."""
    found = None
    for mount in mounts():
        if mount.mountpoint == mountpoint:
            found = mount
    return found


# --- umount ---


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = Path(os.path.realpath(args.mountpoint))
    mount = find_mount(mountpoint)
    if mount is None:
        raise UserError(f"{mountpoint} is not mounted")
    if mount.fstype != FSTYPE:
        raise UserError(f"{mountpoint} is not a swarmfs mount (it is {mount.fstype})")
    data_dir = _node_data_dir(mount) or _data_dir(args)
    pid = data_dir.lock_holder()
    try:
        reply = _shutdown_with_progress(data_dir, args.wait)
    except control.NodeNotRunning:
        if pid is None and _is_dead(mountpoint):
            _lazy_unmount(mountpoint)
            note = f"no node was serving {mountpoint}; cleared the dead mount"
            print(f"swarmfs: {note}", file=sys.stderr)
            return 0
        raise
    except control.ConnectionLost:
        # The node may close the connection as it exits, before replying.
        if data_dir.wait_released(SHUTDOWN_GRACE):
            return 0
        raise
    if not data_dir.wait_released(SHUTDOWN_GRACE):
        raise UserError(
            f"the node (pid {pid}) had not exited {SHUTDOWN_GRACE:g} s after unmounting"
        )
    for failure in reply.get("uncommitted") or []:
        print(f"swarmfs: error: an open file could not be committed: {failure}", file=sys.stderr)
    backlog = reply.get("backlog") or {}
    if backlog.get("chunks") or backlog.get("records"):
        print(
            f"swarmfs: warning: {_backlog_text(backlog)} had not reached a peer;"
            " they will be sent when this node runs again",
            file=sys.stderr,
        )
    return 1 if reply.get("uncommitted") else 0


def _shutdown_with_progress(data_dir: DataDir, wait: float) -> dict[str, Any]:
    """Ask the node to shut down; meanwhile show its replication backlog shrinking."""
    request = {"cmd": "shutdown", "wait": wait}
    console = Console(stderr=True)
    with (
        ThreadPoolExecutor(max_workers=1) as pool,
        Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            console=console,
            transient=True,
        ) as progress,
    ):
        reply = pool.submit(control.request, data_dir, request, wait + SHUTDOWN_GRACE)
        task = progress.add_task("flushing", total=None)
        peak = 0
        while True:
            try:
                return reply.result(timeout=PROGRESS_INTERVAL)
            except FutureTimeout:
                pass
            backlog = _backlog(data_dir)
            if backlog is not None:
                left = backlog.get("bytes", 0)
                peak = max(peak, left)
                progress.update(
                    task,
                    description=f"replicating: {_backlog_text(backlog)} left",
                    total=peak or None,
                    completed=peak - left,
                )


def _backlog(data_dir: DataDir) -> dict[str, int] | None:
    """The node's backlog for display only; None when it cannot say right now."""
    try:
        return control.request(data_dir, {"cmd": "status"}, STATUS_TIMEOUT)["backlog"]
    except (UserError, KeyError):
        return None


def _backlog_text(backlog: dict[str, int]) -> str:
    return (
        f"{backlog.get('chunks', 0)} chunks ({human_bytes(backlog.get('bytes', 0))}),"
        f" {backlog.get('records', 0)} records"
    )


# --- status ---


def cmd_status(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    if args.watch:
        return _watch(data_dir, args.json)
    status = get_status(data_dir)
    if args.json:
        print(json.dumps(status))
    else:
        Console().print(render_status(status))
    return 0


def get_status(data_dir: DataDir) -> dict[str, Any]:
    """The running node's status, or the data dir's when no node runs there."""
    try:
        return control.request(data_dir, {"cmd": "status"}, STATUS_TIMEOUT)
    except control.NodeNotRunning:
        from swarmfs.node import offline_status  # see _run_node on why it is imported here

        return offline_status(data_dir, load_config(data_dir.path))


def _watch(data_dir: DataDir, as_json: bool) -> int:
    peak = 0
    with contextlib.suppress(KeyboardInterrupt), Live(auto_refresh=False) as live:
        while True:
            status = get_status(data_dir)
            if as_json:
                print(json.dumps(status), flush=True)
            else:
                left = status["backlog"]["bytes"]
                peak = max(peak, left)
                bar = Group(
                    f"replication backlog: {_backlog_text(status['backlog'])}",
                    ProgressBar(total=peak or 1, completed=peak - left if peak else 1),
                )
                live.update(Group(render_status(status), bar), refresh=True)
            time.sleep(WATCH_INTERVAL)
    return 0


def render_status(status: dict[str, Any]) -> RenderableType:
    running = f"running, pid {status['pid']}" if status["running"] else "not running"
    summary = Table.grid(padding=(0, 2))
    node_id = status["node_id"] or "no identity yet (swarmfs init creates one)"
    summary.add_row("node", f"{node_id} ({running})")
    summary.add_row("listen", status["listen"])
    summary.add_row("files", str(status["files"]))
    summary.add_row("stored", human_bytes(status["bytes_stored"]))
    cache = f"{human_bytes(status['bytes_cached'])} of {human_bytes(status['cache_limit'])}"
    summary.add_row("cached", cache)
    summary.add_row("backlog", _backlog_text(status["backlog"]))
    count = len(status["peers"])
    peers = Table(title=f"{count} peer{'' if count == 1 else 's'}", title_justify="left")
    for column in ("id", "address", "connected", "last seen", "rtt"):
        peers.add_column(column)
    now = time.time()
    for peer in status["peers"]:
        last_seen = peer["last_seen"]
        rtt = peer["rtt_ms"]
        peers.add_row(
            peer["id"][:12],
            peer["address"],
            "yes" if peer["connected"] else "no",
            "never" if last_seen is None else f"{_ago(now - last_seen)} ago",
            "-" if rtt is None else f"{rtt:.1f} ms",
        )
    return Group(summary, peers)


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{max(seconds, 0):.0f} s"


def human_bytes(count: int) -> str:
    """Binary units, like the sizes swarmfs accepts (``10G`` is 10 GiB)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    size, index = float(count), 0
    while size >= 1024 and index < len(units) - 1:
        size /= 1024
        index += 1
    return f"{count} B" if index == 0 else f"{size:.1f} {units[index]}"


# --- invite and join ---


def cmd_invite(args: argparse.Namespace) -> int:
    from swarmfs.invite import invite_token

    print(invite_token(_data_dir(args)))
    print(
        "swarmfs: keep this token secret: it holds the swarm key, so whoever has it"
        " can read and change every file in the swarm",
        file=sys.stderr,
    )
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    from swarmfs.invite import join

    data_dir = _data_dir(args)
    addresses = join(data_dir, args.token)
    print(f"{data_dir.path}: joined the swarm; bootstrap {', '.join(map(str, addresses))}")
    if data_dir.lock_holder() is not None:
        print("swarmfs: the node running there uses them once restarted", file=sys.stderr)
    else:
        where = f" --data-dir {data_dir.path}" if args.data_dir else ""
        print(f"next: swarmfs mount MOUNTPOINT{where}")
    return 0


# --- fsck ---


def cmd_fsck(args: argparse.Namespace) -> int:
    from swarmfs import fsck

    data_dir = _data_dir(args)
    try:
        try:
            request = {"cmd": "fsck", "repair": args.repair}
            report = fsck.Report.from_json(control.request(data_dir, request, FSCK_TIMEOUT))
        except control.NodeNotRunning:
            report = fsck.check_offline(data_dir, args.repair)
    except UserError as exc:
        print(f"swarmfs: fsck could not run: {exc}", file=sys.stderr)
        return EXIT_FSCK_FAILED
    for line in report.problems:
        print(line)
    if report.omitted:
        print(f"... and {report.omitted} more problems")
    print(report.summary(args.repair))
    return 1 if report.damaged else 0


# --- trash ---


def cmd_trash(args: argparse.Namespace) -> int:
    from swarmfs import trash

    data_dir = _data_dir(args)
    try:
        status: dict[str, Any] | None = control.request(data_dir, {"cmd": "status"}, STATUS_TIMEOUT)
    except control.NodeNotRunning:
        status = None
    if args.action == "list":
        if args.path is not None:
            raise UserError("trash list takes no PATH")
        if status is None:
            entries = [e.as_json() for e in trash.list_offline(data_dir)]
        else:
            entries = control.request(data_dir, {"cmd": "trash_list"}, STATUS_TIMEOUT)["entries"]
        _print_trash(entries, load_config(data_dir.path).trash_retention)
        return 0
    if args.path is None:
        raise UserError("trash restore needs the PATH of a deleted file (see: swarmfs trash list)")
    mountpoint = status.get("mountpoint") if status is not None else None
    path = trash.swarm_path(args.path, Path(mountpoint) if mountpoint else None)
    shown = trash.display_path(path)
    if status is None:
        trash.restore_offline(data_dir, path)
        print(f"restored {shown} (the node is not running: peers get it when it next runs)")
        return 0
    request = {"cmd": "trash_restore", "path": os.fsdecode(path)}
    reply = control.request(data_dir, request, STATUS_TIMEOUT)
    if "user_error" in reply:
        raise UserError(reply["user_error"])
    print(f"restored {shown}")
    return 0


def _print_trash(entries: list[dict[str, Any]], retention: int) -> None:
    if not entries:
        print("the trash is empty")
        return
    print(f"{'DELETED':19}  {'BY':12}  {'SIZE':>10}  PATH")
    for entry in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["deleted_at"]))
        size = human_bytes(entry["size"])
        print(f"{when:19}  {entry['deleted_by'][:12]:12}  {size:>10}  {entry['path']}")
    kept = f"kept for {_ago(retention)} after deletion" if retention else "trash is off"
    noun = "file" if len(entries) == 1 else "files"
    print(f"{len(entries)} deleted {noun}; {kept}", file=sys.stderr)


# --- demo ---


def cmd_demo(args: argparse.Namespace) -> int:
    from swarmfs.demo import run_demo

    return run_demo(args.exit)
