"""``swarmfs demo``: a 3-node swarm on loopback, walked through write, read and delete.

Three real node processes, each started with the real ``swarmfs mount``
command, with its own data dir and mountpoint under one temporary directory
and one shared swarm key (``--swarm-key-file``). Node 1 listens on a port the
kernel picks (``127.0.0.1:0``, read back from its status, so no port is ever
guessed); nodes 2 and 3 bootstrap from it and meet each other by peer
exchange. Every step waits on a condition with a deadline, never a bare sleep,
and a step that does not happen in time ends the demo with exit status 1.

At the end the swarm stays up until Ctrl-C (or SIGTERM) for the user to try;
``--exit`` tears it down at once. Teardown unmounts each node with ``swarmfs
umount``; only if that fails, a lazy unmount and SIGKILL of the pid in that
node's own ``swarmfs.pid``. The temporary directory is removed, unless a step
failed: then the logs stay for a look.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.panel import Panel

from swarmfs import control
from swarmfs.cli import find_mount, render_status
from swarmfs.crypto.keys import encode_swarm_key, new_swarm_key, write_secret
from swarmfs.datadir import DataDir

T = TypeVar("T")

NODES = 3
STEP_TIMEOUT = 30.0
"""Seconds any one step (a mount, the mesh forming, a replication) may take."""
COMMAND_TIMEOUT = 90.0
POLL_START = 0.01
POLL_MAX = 0.2


class DemoFailed(Exception):
    """A step did not happen; the message says which and why."""


@dataclass
class DemoNode:
    number: int
    data_dir: DataDir
    mountpoint: Path

    def status(self) -> dict[str, Any]:
        return control.request(self.data_dir, {"cmd": "status"}, 5.0)

    def connected(self) -> int:
        return sum(1 for peer in self.status()["peers"] if peer["connected"])


def wait_for(predicate: Callable[[], T], what: str, timeout: float = STEP_TIMEOUT) -> T:
    """Poll ``predicate`` until it returns something truthy, or fail the demo."""
    deadline = time.monotonic() + timeout
    interval = POLL_START
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
        interval = min(interval * 2, POLL_MAX)


def _swarmfs(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "swarmfs", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


class Demo:
    def __init__(self, console: Console, base: Path) -> None:
        self.console = console
        self.base = base
        self.key_file = base / "swarm.key"
        self.nodes: list[DemoNode] = []

    def step(self, text: str) -> None:
        self.console.print(f"[green]✓[/green] {text}")

    def short(self, node: DemoNode) -> str:
        """A mountpoint relative to the demo's directory, so narration lines stay short."""
        return str(node.mountpoint.relative_to(self.base))

    def start(self, number: int, bootstrap: str | None) -> DemoNode:
        node = DemoNode(number, DataDir(self.base / f"node{number}"), self.base / f"mnt{number}")
        node.mountpoint.mkdir()
        args: list[str | Path] = ["mount", node.mountpoint, "--data-dir", node.data_dir.path]
        args += ["--listen", "127.0.0.1:0", "--swarm-key-file", self.key_file]
        if bootstrap is not None:
            args += ["--bootstrap", bootstrap]
        self.nodes.append(node)  # before it runs, so a half-started node is torn down too
        result = _swarmfs(*args)
        if result.returncode != 0:
            reason = result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"]
            raise DemoFailed(f"node {number} did not start: {reason[0]}")
        return node

    def run(self) -> None:
        write_secret(self.key_file, encode_swarm_key(new_swarm_key()))
        with self.console.status("starting node 1"):
            first = self.start(1, None)
        address = first.status()["listen"]
        self.step(f"node 1 is up: listening on {address}, mounted at {self.short(first)}")
        for number in range(2, NODES + 1):
            with self.console.status(f"starting node {number}"):
                node = self.start(number, address)
            self.step(f"node {number} is up: joined through node 1, mounted at {self.short(node)}")
        with self.console.status("waiting for every node to see the others"):
            wait_for(
                lambda: all(n.connected() >= NODES - 1 for n in self.nodes),
                "every node to connect to the other two (TLS 1.3, mutual auth)",
            )
        self.step("the swarm is connected: each node holds TLS links to the other two")

        one, two, three = self.nodes
        content = f"hello from node 1, written at {time.strftime('%H:%M:%S')}\n".encode()
        (one.mountpoint / "hello.txt").write_bytes(content)
        self.step(f"node 1 wrote {self.short(one)}/hello.txt ({len(content)} bytes)")
        started = time.monotonic()
        with self.console.status("waiting for hello.txt on node 3"):
            wait_for(
                lambda: _read(three.mountpoint / "hello.txt") == content,
                "hello.txt to reach node 3 with the same content",
            )
        took = time.monotonic() - started
        self.step(f"node 3 reads it after {took:.2f} s: {content.decode().strip()!r}")

        (two.mountpoint / "hello.txt").unlink()
        self.step(f"node 2 deleted {self.short(two)}/hello.txt")
        with self.console.status("waiting for the delete to reach every node"):
            wait_for(
                lambda: not any((n.mountpoint / "hello.txt").exists() for n in self.nodes),
                "hello.txt to disappear from every node",
            )
        self.step("hello.txt is gone on all three nodes (each keeps it in its trash)")

        for node in self.nodes:
            self.console.print(
                Panel(render_status(node.status()), title=f"node {node.number}", title_align="left")
            )
        self.console.print("Mountpoints:")
        for node in self.nodes:
            self.console.print(f"  node {node.number}  {node.mountpoint}")

    def teardown(self) -> list[str]:
        """Unmount every node this demo started; returns what went wrong."""
        problems: list[str] = []
        for node in reversed(self.nodes):
            if find_mount(Path(os.path.realpath(node.mountpoint))) is None:
                continue  # it never mounted (its start-up error was reported)
            result = _swarmfs("umount", node.mountpoint, "--wait", "5")
            if result.returncode == 0:
                continue
            problems.append(f"node {node.number}: umount failed: {result.stderr.strip()}")
            subprocess.run(["fusermount3", "-uz", str(node.mountpoint)], check=False)
            pid = node.data_dir.read_pid()  # this node's own pid file, never a name search
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return problems

    def try_it(self) -> None:
        one, _, three = self.nodes
        self.console.print(
            "\nTry it in another terminal:\n"
            f"  echo hi > {one.mountpoint}/x && cat {three.mountpoint}/x\n"
            f"  swarmfs status --data-dir {one.data_dir.path}\n"
            f"  swarmfs trash list --data-dir {three.data_dir.path}\n"
        )


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM tears the demo down like Ctrl-C does."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(exit_at_end: bool) -> int:
    """The whole demo; the exit status for the CLI."""
    console = Console(highlight=False)
    base = Path(tempfile.mkdtemp(prefix="swarmfs-demo-"))
    demo = Demo(console, base)
    status, keep = 0, False
    console.print(f"[bold]swarmfs demo[/bold]: {NODES} nodes on loopback, everything in {base}")
    with _sigterm_interrupts():
        try:
            demo.run()
            if not exit_at_end:
                demo.try_it()
                console.print("The swarm stays up until Ctrl-C.")
                while True:
                    signal.pause()
        except DemoFailed as exc:
            console.print(f"[red]✗[/red] {exc}")
            status, keep = 1, True
        except KeyboardInterrupt:
            status = 0 if not exit_at_end else 130
        finally:
            with console.status("tearing down: unmounting every node"):
                problems = demo.teardown()
    for problem in problems:
        console.print(f"[red]✗[/red] {problem}")
    if problems or keep:
        console.print(f"logs kept in {base}/node*/swarmfs.log")
        return status or 1
    shutil.rmtree(base, ignore_errors=True)
    console.print("[green]✓[/green] the swarm is down and its temporary files are removed")
    return status
