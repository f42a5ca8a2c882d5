"""What the benchmark starts and stops: mounts, sshd, Syncthing, swarmfs nodes.

Each service is a context manager that starts its processes on loopback, waits
(bounded) until they answer, and on exit stops exactly the processes it started,
by pid, and unmounts what it mounted. Nothing here measures; ``bench.py`` does.
Synchronous and single-threaded: the benchmark drives one thing at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
POLL = 0.02

APT_PACKAGES = {
    "sshfs": "/usr/bin/sshfs",
    "openssh-server": "/usr/sbin/sshd",
    "syncthing": "/usr/bin/syncthing",
}


class BenchError(Exception):
    """Set-up or a wait failed: the benchmark stops with this one line."""


class WaitTimeout(BenchError):
    """A bounded wait ran out: the measure that waited is recorded as timed out."""


# --- small helpers ---


def wait_until(
    what: str, condition: Callable[[], object], timeout: float, poll: float = POLL
) -> object:
    """Poll ``condition`` until it returns something truthy; BenchError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


def bounded(what: str, function: Callable[[], T], timeout: float) -> T:
    """``function()`` in a daemon thread, given up after ``timeout`` seconds.

    For waits that read through a mount: a stuck FUSE request cannot hang the
    benchmark, and is released when the mount's process is stopped at clean-up.
    """
    outcome: list = []

    def call() -> None:
        try:
            outcome.append((True, function()))
        except BaseException as exc:  # handed to the caller below
            outcome.append((False, exc))

    thread = threading.Thread(target=call, name=what, daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise WaitTimeout(f"gave up after {timeout:g} s on {what} (a request hung)")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def free_port() -> int:
    """A port on 127.0.0.1 free right now (the OS picks it; a small race is accepted)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def run(argv: list[str | Path], timeout: float = 600.0, **kwargs) -> subprocess.CompletedProcess:
    """Run a command to completion within ``timeout``; BenchError with its stderr if it fails."""
    try:
        done = subprocess.run(
            [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kwargs
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{argv[0]} did not finish within {timeout:g} s") from None
    if done.returncode != 0:
        raise BenchError(
            f"{' '.join(map(str, argv))} failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    return done


def mounted(mountpoint: Path) -> bool:
    """Is something mounted exactly at ``mountpoint`` (a resolved path)?"""
    target = os.fsencode(mountpoint)
    for line in Path("/proc/self/mountinfo").read_bytes().splitlines():
        field_ = line.split(b" ")[4]
        field_ = field_.replace(b"\\040", b" ").replace(b"\\134", b"\\")
        if field_ == target:
            return True
    return False


def stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the process we started, then SIGKILL if it lingers; always reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=timeout)


def stop_pid(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    """The same for a process that is not our child (a daemonised node), by its pid."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.05)


def unmount(mountpoint: Path) -> None:
    """Unmount if mounted: politely, then lazily."""
    if not mounted(mountpoint):
        return
    if (
        subprocess.run(
            ["fusermount3", "-u", str(mountpoint)], capture_output=True, timeout=STOP_TIMEOUT
        ).returncode
        != 0
    ):
        subprocess.run(
            ["fusermount3", "-uz", str(mountpoint)], capture_output=True, timeout=STOP_TIMEOUT
        )


def wait_mounted(mountpoint: Path, proc: subprocess.Popen | None, what: str) -> None:
    def ready() -> bool:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} before mounting")
        return mounted(mountpoint)

    wait_until(f"{what} to mount {mountpoint}", ready, START_TIMEOUT)


def peak_rss(pid: int) -> int:
    """VmHWM of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmHWM for pid {pid}")


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: ``5`` to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


# --- set-up of tools ---


def ensure_apt_packages(log: Callable[[str], None]) -> None:
    missing = [name for name, path in APT_PACKAGES.items() if not Path(path).exists()]
    if not missing:
        return
    log(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-q"], timeout=600, env=env)
    run(["apt-get", "install", "-y", "-q", *missing], timeout=900, env=env)


def fetch_passthroughfs(workdir: Path) -> Path:
    """pyfuse3's examples/passthroughfs.py from its source distribution."""
    import pyfuse3

    download = workdir / "sdist"
    download.mkdir()
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-binary",
            "pyfuse3",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
            download,
            f"pyfuse3=={pyfuse3.__version__}",
        ],
        timeout=300,
    )
    (archive,) = download.glob("pyfuse3-*.tar.gz")
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("examples/passthroughfs.py"))
        member.name = "passthroughfs.py"
        tar.extract(member, workdir, filter="data")
    return workdir / "passthroughfs.py"


# --- filesystems under test ---


@dataclass
class Target:
    """A directory to measure, with the process serving it (None: the plain disk)."""

    name: str
    path: Path
    pid: int | None = None


@contextlib.contextmanager
def plain_dir(name: str, path: Path) -> Iterator[Target]:
    path.mkdir(parents=True)
    yield Target(name, path)


@contextlib.contextmanager
def passthroughfs(script: Path, source: Path, mountpoint: Path) -> Iterator[Target]:
    source.mkdir(parents=True)
    mountpoint.mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(source), str(mountpoint)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_mounted(mountpoint, proc, "passthroughfs")
        yield Target("passthroughfs", mountpoint, proc.pid)
    finally:
        unmount(mountpoint)
        stop_process(proc)


@contextlib.contextmanager
def sshd(workdir: Path) -> Iterator[tuple[int, Path]]:
    """sshd on a loopback port with a throwaway host key; yields (port, client key)."""
    workdir.mkdir(parents=True)
    for key in ("host", "client"):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", workdir / key])
    shutil.copy(workdir / "client.pub", workdir / "authorized_keys")
    port = free_port()
    config = workdir / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {workdir / 'host'}\n"
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n"
        "Subsystem sftp internal-sftp\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
    log = (workdir / "sshd.log").open("wb")
    proc = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"sshd exited; see {workdir / 'sshd.log'}")
            return port_open(port)

        wait_until("sshd to listen", up, START_TIMEOUT)
        yield port, workdir / "client"
    finally:
        stop_process(proc)
        log.close()


@contextlib.contextmanager
def sshfs(port: int, key: Path, source: Path, mountpoint: Path) -> Iterator[Target]:
    source.mkdir(parents=True)
    mountpoint.mkdir(parents=True)
    options = (
        f"IdentityFile={key},StrictHostKeyChecking=no,"
        "UserKnownHostsFile=/dev/null,BatchMode=yes,LogLevel=ERROR"
    )
    proc = subprocess.Popen(
        [
            "sshfs",
            "-f",
            "-p",
            str(port),
            "-o",
            options,
            f"root@127.0.0.1:{source}",
            str(mountpoint),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_mounted(mountpoint, proc, "sshfs")
        yield Target("sshfs", mountpoint, proc.pid)
    finally:
        unmount(mountpoint)
        stop_process(proc)


# --- swarmfs nodes ---


@dataclass
class SwarmNode:
    name: str
    mountpoint: Path
    data_dir: Path
    port: int
    pid: int = 0

    def status(self) -> dict:
        done = run([swarmfs_command(), "status", "--json", "--data-dir", self.data_dir], timeout=30)
        return json.loads(done.stdout)

    def connected_peers(self) -> int:
        return sum(1 for p in self.status().get("peers", []) if p.get("connected"))


def swarmfs_command() -> str:
    return str(Path(sys.executable).with_name("swarmfs"))


@contextlib.contextmanager
def swarm(root: Path, names: list[str], replicas: str | None = None) -> Iterator[list[SwarmNode]]:
    """Nodes mounted under ``root``, the first one the bootstrap of the others.

    Waits until every node is connected to every other. On exit: ``swarmfs umount``
    each, and should that fail, stop the node by the pid in its data dir.
    """
    nodes: list[SwarmNode] = []
    key = root / "swarm.key"
    try:
        for i, name in enumerate(names):
            node = SwarmNode(name, root / f"{name}-mnt", root / f"{name}-data", free_port())
            node.mountpoint.mkdir(parents=True)
            if i == 0:
                run([swarmfs_command(), "init", "--data-dir", node.data_dir])
                shutil.copy(node.data_dir / "swarm.key", key)
            argv: list[str | Path] = [
                swarmfs_command(),
                "mount",
                node.mountpoint,
                "--data-dir",
                node.data_dir,
                "--listen",
                f"127.0.0.1:{node.port}",
                "--swarm-key-file",
                key,
                "-q",
            ]
            if i > 0:
                argv += ["--bootstrap", f"127.0.0.1:{nodes[0].port}"]
            if replicas is not None:
                argv += ["--replicas", replicas]
            nodes.append(node)
            run(argv, timeout=START_TIMEOUT + 30)
            node.pid = int((node.data_dir / "swarmfs.pid").read_text())
        for node in nodes:
            wait_until(
                f"swarmfs node {node.name} to connect to its peers",
                lambda node=node: node.connected_peers() >= len(nodes) - 1,
                START_TIMEOUT,
                poll=0.2,
            )
        yield nodes
    finally:
        for node in reversed(nodes):
            stop_swarm_node(node)


def stop_swarm_node(node: SwarmNode) -> None:
    if mounted(node.mountpoint):
        with contextlib.suppress(BenchError):
            run(
                [
                    swarmfs_command(),
                    "umount",
                    node.mountpoint,
                    "--data-dir",
                    node.data_dir,
                    "--wait",
                    "10",
                ],
                timeout=90,
            )
    if node.pid:
        stop_pid(node.pid)
    unmount(node.mountpoint)


@contextlib.contextmanager
def swarmfs_single(root: Path) -> Iterator[Target]:
    with swarm(root, ["solo"]) as (node,):
        yield Target("swarmfs", node.mountpoint, node.pid)


# --- Syncthing ---


@dataclass
class SyncthingNode:
    name: str
    home: Path
    folder: Path
    gui_port: int
    listen_port: int
    api_key: str
    device_id: str = ""
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def rest(self, method: str, path: str, timeout: float = 10.0) -> object:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.gui_port}{path}",
            method=method,
            headers={"X-API-Key": self.api_key},
        )
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            body = reply.read()
        return json.loads(body) if body else None

    def try_rest(self, path: str) -> object:
        try:
            return self.rest("GET", path)
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def rescan(self) -> None:
        self.rest("POST", "/rest/db/scan?folder=bench")

    def idle(self) -> bool:
        status = self.try_rest("/rest/db/status?folder=bench")
        return isinstance(status, dict) and status.get("state") == "idle"


FOLDER_ID = "bench"


def _syncthing_config(node: SyncthingNode, peer: SyncthingNode) -> None:
    path = node.home / "config.xml"
    tree = ET.parse(path)
    root = tree.getroot()
    for folder in root.findall("folder"):
        root.remove(folder)
    gui = root.find("gui")
    gui.find("address").text = f"127.0.0.1:{node.gui_port}"
    gui.find("apikey").text = node.api_key
    options = root.find("options")
    settings = {
        "listenAddress": f"tcp://127.0.0.1:{node.listen_port}",
        "globalAnnounceEnabled": "false",
        "localAnnounceEnabled": "false",
        "relaysEnabled": "false",
        "natEnabled": "false",
        "startBrowser": "false",
        "urAccepted": "-1",
        "autoUpgradeIntervalH": "0",
        "crashReportingEnabled": "false",
        "setLowPriority": "false",
        "reconnectionIntervalS": "1",
    }
    for key, value in settings.items():
        element = options.find(key)
        if element is None:
            element = ET.SubElement(options, key)
        element.text = value
    device = ET.SubElement(
        root,
        "device",
        id=peer.device_id,
        name=peer.name,
        compression="metadata",
        introducer="false",
    )
    ET.SubElement(device, "address").text = f"tcp://127.0.0.1:{peer.listen_port}"
    folder = ET.Element(
        "folder",
        id=FOLDER_ID,
        label=FOLDER_ID,
        path=str(node.folder),
        type="sendreceive",
        rescanIntervalS="3600",
        fsWatcherEnabled="true",
        fsWatcherDelayS="1",
        ignorePerms="false",
        autoNormalize="true",
    )
    for device_id in (node.device_id, peer.device_id):
        ET.SubElement(folder, "device", id=device_id, introducedBy="")
    root.insert(0, folder)
    tree.write(path)


@contextlib.contextmanager
def syncthing_pair(root: Path) -> Iterator[tuple[SyncthingNode, SyncthingNode]]:
    """Two Syncthing instances on loopback sharing folder ``bench``, connected and idle."""
    env = {**os.environ, "STNODEFAULTFOLDER": "1", "STNOUPGRADE": "1", "STNORESTART": "1"}
    nodes = []
    for name in ("a", "b"):
        home = root / f"st-{name}"
        node = SyncthingNode(
            name, home, root / f"st-{name}-folder", free_port(), free_port(), os.urandom(16).hex()
        )
        node.folder.mkdir(parents=True)
        (node.folder / ".stfolder").mkdir()
        run(["syncthing", "generate", f"--home={home}", "--no-default-folder"], env=env)
        node.device_id = run(
            ["syncthing", "serve", f"--home={home}", "--device-id"], env=env
        ).stdout.strip()
        nodes.append(node)
    a, b = nodes
    _syncthing_config(a, b)
    _syncthing_config(b, a)
    try:
        for node in nodes:
            log = (node.home / "stdout.log").open("wb")
            node.proc = subprocess.Popen(
                [
                    "syncthing",
                    "serve",
                    f"--home={node.home}",
                    "--no-browser",
                    "--no-restart",
                    "--no-upgrade",
                    f"--logfile={node.home / 'syncthing.log'}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
            log.close()
        for node, peer in ((a, b), (b, a)):

            def connected(node=node, peer=peer) -> bool:
                if node.proc.poll() is not None:
                    raise BenchError(f"syncthing {node.name} exited; see {node.home}")
                conns = node.try_rest("/rest/system/connections")
                return bool(conns and conns["connections"].get(peer.device_id, {}).get("connected"))

            wait_until(f"syncthing {node.name} to connect", connected, 60, poll=0.2)
        for node in nodes:
            wait_until(f"syncthing {node.name} folder to be idle", node.idle, 60, poll=0.2)
        yield a, b
    finally:
        for node in nodes:
            if node.proc is not None:
                stop_process(node.proc)
