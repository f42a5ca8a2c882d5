"""Network namespaces for the network-fault tests (DESIGN.md §7 "Network faults").

A ``Lab`` builds a small routed network that exists only inside namespaces it
creates: one hub namespace and one namespace per node, each node joined to
the hub by a veth pair (node side ``eth0`` = ``10.77.N.2/24``, hub side
``hN`` = ``10.77.N.1/24``, the hub forwarding between them). Nothing is
added to the host's own namespace. Faults are made with the kernel's tools,
never with netem (this kernel has none):

- ``link(i, up=False)``: cut node i off (``ip link set hI down``), e.g. a 2|1
  partition; ``link(i)`` restores it.
- ``loss(percent)``: nftables ``numgen random mod 100 < N drop`` on every
  node's ``eth0`` input, so each direction of every link loses that share.
- ``rate(bits)``: ``tc ... tbf`` on the hub's side of every link.
- ``delay(seconds)``: a ``DelayRelay`` (threads, in the hub namespace) that
  the hub's nftables ``redirect`` makes transparent: every TCP connection to
  a node's port goes through it and each direction waits ``seconds`` in it.

Nodes run under ``nsenter --net=/run/netns/NAME swarmfs mount ...`` so that
only their network namespace differs: their FUSE mounts stay visible to the
test, and ``swarmfs status``/``umount`` reach them over the (path-based)
control socket from the host namespace. ``FaultSwarm`` with a lab is a
``swarm_harness.Swarm`` whose nodes are started that way (``FaultSwarm``
without a lab is the same on loopback).

Everything a ``Lab`` made (namespaces and with them their links, nftables
tables and qdiscs; the relay's threads and sockets) is removed in ``close``,
which the context manager runs however the test ended. Take nodes down
before the lab (nest the swarm inside the lab).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import queue
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from mounted import mount_entry, process_alive, run, swarmfs_command, wait_until
from ports import free_port
from swarm_harness import Swarm, SwarmNode, require_fuse

NODE_PORT = 7000
"""Every node listens on this port in its own namespace."""
RELAY_PORT = 7999
_CLONE_NEWNET = 0x40000000
_SO_ORIGINAL_DST = 80
_counter = itertools.count()


def tools_missing() -> str | None:
    """Why namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft", "tc", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 nftables util-linux)"
    return None


def sh(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        list(args), input=input, capture_output=True, text=True, timeout=30, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def enter_netns(path: str) -> None:
    """Move the *calling thread* into the network namespace at ``path``.

    ``setns(2)`` acts per thread, so only threads made for the purpose call it;
    sockets keep the namespace they were created in.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class Lab:
    """A hub namespace routing between ``n`` node namespaces; see the module docstring."""

    def __init__(self, n: int) -> None:
        tag = f"sfx{os.getpid() % 100000}-{next(_counter)}"
        self.hub = f"{tag}-hub"
        self.names = [f"{tag}-n{i}" for i in range(n)]
        self._made: list[str] = []
        self._relay: DelayRelay | None = None

    def __enter__(self) -> Lab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- topology -----------------------------------------------------------------------
    def _add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self._made.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add_ns(self.hub)
        self.in_ns(self.hub, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for i, name in enumerate(self.names):
            self._add_ns(name)
            hub_side, node_side = self.hub_if(i), "eth0"
            sh("ip", "-n", self.hub, "link", "add", hub_side, "type", "veth",
               "peer", "name", node_side, "netns", name)  # fmt: skip
            sh("ip", "-n", self.hub, "addr", "add", f"10.77.{i + 1}.1/24", "dev", hub_side)
            sh("ip", "-n", name, "addr", "add", f"{self.address(i)}/24", "dev", node_side)
            sh("ip", "-n", self.hub, "link", "set", hub_side, "up")
            sh("ip", "-n", name, "link", "set", node_side, "up")
            sh("ip", "-n", name, "route", "add", "default", "via", f"10.77.{i + 1}.1")

    def close(self) -> None:
        if self._relay is not None:
            self._relay.stop()
            self._relay = None
        for name in reversed(self._made):
            # Tables and qdiscs vanish with their namespace; removed first all the same,
            # so nothing lingers should a process still hold the namespace open.
            self.in_ns(name, "nft", "flush", "ruleset", check=False)
            sh("ip", "netns", "del", name, check=False)
        self._made.clear()

    @staticmethod
    def path(name: str) -> str:
        return f"/run/netns/{name}"

    def node_path(self, i: int) -> str:
        return self.path(self.names[i])

    @staticmethod
    def address(i: int) -> str:
        return f"10.77.{i + 1}.2"

    @staticmethod
    def hub_if(i: int) -> str:
        return f"h{i}"

    def in_ns(self, name: str, *cmd: str, input: str | None = None, check: bool = True):
        return sh("nsenter", f"--net={self.path(name)}", *cmd, input=input, check=check)

    # -- faults -------------------------------------------------------------------------
    def link(self, i: int, up: bool = True) -> None:
        sh("ip", "-n", self.hub, "link", "set", self.hub_if(i), "up" if up else "down")

    def loss(self, percent: int) -> None:
        """Drop ``percent`` % of the packets each node receives (0 removes the rule)."""
        for name in self.names:
            self.in_ns(name, "nft", "delete", "table", "inet", "swarmfs_loss", check=False)
            if percent:
                self.in_ns(name, "nft", "-f", "-", input=(
                    "table inet swarmfs_loss {\n"
                    "  chain input {\n"
                    "    type filter hook input priority 0; policy accept;\n"
                    f'    iifname "eth0" numgen random mod 100 < {percent} drop\n'
                    "  }\n"
                    "}\n"
                ))  # fmt: skip

    def rate(self, rate: str | None, nodes: list[int] | None = None) -> None:
        """Limit what the hub sends towards each node (``tbf``), e.g. ``"40mbit"``."""
        for i in range(len(self.names)) if nodes is None else nodes:
            dev = self.hub_if(i)
            sh("tc", "-n", self.hub, "qdisc", "del", "dev", dev, "root", check=False)
            if rate is not None:
                sh("tc", "-n", self.hub, "qdisc", "add", "dev", dev, "root", "tbf",
                   "rate", rate, "burst", "64kb", "latency", "400ms")  # fmt: skip

    def delay(self, seconds: float) -> DelayRelay:
        """Route every node-to-node TCP connection through a relay adding ``seconds`` each way."""
        assert self._relay is None, "one relay per lab"
        relay = DelayRelay(self.path(self.hub), seconds)
        relay.start()
        self._relay = relay
        self.in_ns(self.hub, "nft", "-f", "-", input=(
            "table ip swarmfs_relay {\n"
            "  chain prerouting {\n"
            "    type nat hook prerouting priority dstnat; policy accept;\n"
            f'    iifname "h*" tcp dport {NODE_PORT} redirect to :{RELAY_PORT}\n'
            "  }\n"
            "}\n"
        ))  # fmt: skip
        return relay


class DelayRelay:
    """A transparent TCP relay that holds every byte ``delay`` seconds in each direction.

    Runs in threads that live in the hub's namespace. The original destination
    of a redirected connection comes from ``SO_ORIGINAL_DST``. Each direction
    is a reader (stamps data with its due time) and a writer (sends it when
    due); a bounded queue gives backpressure. The waits in the writer are the
    fault being injected, not a synchronisation.
    """

    def __init__(self, netns_path: str, delay: float) -> None:
        self.netns_path = netns_path
        self.delay = delay
        self.connections = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._spawn(self._serve)
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        assert self._ready.is_set(), "relay did not start"

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()
        for t in self._threads:
            t.join(timeout=5)

    def _spawn(self, target, *args) -> None:  # type: ignore[no-untyped-def]
        t = threading.Thread(target=target, args=args, daemon=True, name="delay-relay")
        with self._lock:
            self._threads.append(t)
        t.start()

    def _track(self, s: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(s)
        return s

    def _serve(self) -> None:
        try:
            enter_netns(self.netns_path)
            listener = self._track(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("0.0.0.0", RELAY_PORT))
            listener.listen(64)
            listener.settimeout(0.2)  # to notice stop()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._spawn(self._relay, self._track(client))

    def _relay(self, client: socket.socket) -> None:
        enter_netns(self.netns_path)  # the upstream socket must live in the hub too
        raw = client.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
        port, packed = struct.unpack_from("!2xH4s", raw)
        target = (socket.inet_ntoa(packed), port)
        client.settimeout(None)
        try:
            upstream = self._track(socket.create_connection(target, timeout=10))
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self.connections += 1
        for src, dst in ((client, upstream), (upstream, client)):
            q: queue.Queue[tuple[float, bytes]] = queue.Queue(maxsize=256)
            self._spawn(self._read, src, q)
            self._spawn(self._write, dst, q)

    def _read(self, src: socket.socket, q: queue.Queue[tuple[float, bytes]]) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            q.put((time.monotonic() + self.delay, data))
            if not data:
                return
            with self._lock:
                self.bytes += len(data)

    def _write(self, dst: socket.socket, q: queue.Queue[tuple[float, bytes]]) -> None:
        while True:
            due, data = q.get()
            wait = due - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            try:
                dst.sendall(data)
            except OSError:
                return


def mount_is_live(mountpoint: Path) -> bool:
    """The FUSE connection answers (``statvfs`` always reaches the node; ``stat`` may be
    answered from the kernel's attribute cache for a few seconds after the node died)."""
    try:
        os.statvfs(mountpoint)
    except OSError:
        return False
    return mount_entry(mountpoint) is not None


class FaultNode(SwarmNode):
    """A ``SwarmNode`` that may run in a lab namespace and may be remounted right after a crash.

    ``mount`` runs ``[nsenter --net=NETNS] swarmfs mount ...``: only the network
    namespace differs, so the FUSE mount stays visible here.
    """

    def __init__(self, swarm: FaultSwarm, name: str, index: int) -> None:
        lab = swarm.lab
        super().__init__(swarm, name, NODE_PORT if lab is not None else free_port())
        self.index = index
        self.netns: str | None = None
        if lab is not None:
            self.netns = lab.node_path(index)
            self.listen = f"{lab.address(index)}:{NODE_PORT}"

    def mount(self) -> None:
        assert not mount_is_live(self.mountpoint), f"{self.mountpoint} is already mounted"
        prefix = ["nsenter", f"--net={self.netns}"] if self.netns is not None else []
        run(
            [
                *prefix,
                *swarmfs_command(),
                "mount",
                self.mountpoint,
                "--data-dir",
                self.data_dir,
                "--listen",
                self.listen,
                *self.mount_args,
            ],
            timeout=70,
        )
        assert self.answers(), "swarmfs mount returned 0 but the mount does not answer"
        pid = wait_until(self._read_pid, 10, f"{self.pid_file}")
        assert process_alive(pid), f"pid {pid} from {self.pid_file} is not running"
        self.pid = pid
        self._started.add(pid)

    def mount_command(self) -> list[str]:
        """What ``start`` runs, for tests that start the node without waiting."""
        prefix = ["nsenter", f"--net={self.netns}"] if self.netns is not None else []
        args = [*prefix, *swarmfs_command(), "mount", str(self.mountpoint),
                "--data-dir", str(self.data_dir), "--listen", self.listen]  # fmt: skip
        if self.swarm_key_file is not None:
            args += ["--swarm-key-file", str(self.swarm_key_file)]
        for address in self.bootstrap:
            args += ["--bootstrap", address]
        if self.replicas is not None:
            args += ["--replicas", self.replicas]
        return args

    def adopt(self, pid: int) -> None:
        """Take on a node process started by ``mount_command`` (for ``kill9`` and cleanup)."""
        self.pid = pid
        self._started.add(pid)
        self.swarm.running.add(self)


class FaultSwarm(Swarm):
    """A ``Swarm`` of ``FaultNode``s: on loopback, or node i in the lab's namespace i."""

    def __init__(self, base: Path, lab: Lab | None = None) -> None:
        super().__init__(base)
        self.lab = lab

    def new_node(self, name: str) -> FaultNode:
        """Node i lives in the lab's namespace i (the base class does the rest of ``add``)."""
        index = len(self.nodes)
        assert self.lab is None or index < len(self.lab.names), "more nodes than namespaces"
        return FaultNode(self, name, index)

    def start(self, n: int, *, replicas: int | str | None = None) -> list[FaultNode]:  # type: ignore[override]
        return super().start(n, replicas=replicas)  # type: ignore[return-value]


@contextlib.contextmanager
def netns_swarm(base: Path, n: int) -> Iterator[tuple[Lab, FaultSwarm]]:
    """A lab of ``n`` namespaces and a swarm to put in them, both taken down on exit."""
    with Lab(n) as lab, FaultSwarm(base, lab) as swarm:
        yield lab, swarm


@contextlib.contextmanager
def loopback_swarm(base: Path) -> Iterator[FaultSwarm]:
    """A ``FaultSwarm`` on loopback (skips where FUSE is absent), taken down on exit."""
    require_fuse()
    with FaultSwarm(base) as swarm:
        yield swarm
