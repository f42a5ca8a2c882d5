"""Membership seen from outside: real ``swarmfs`` processes on loopback, observed
through ``swarmfs status --json`` and the nodes' logs (DESIGN.md §1, §4, §5).

Each test starts its own nodes (``swarm`` fixture, tests/swarm_harness.py) and
takes them all down afterwards.
"""

from __future__ import annotations

import re
import socket
import subprocess

import pytest
from mounted import process_alive, swarmfs_command
from swarm_harness import CONNECT_TIMEOUT, SYNC_TIMEOUT, Swarm, eventually

pytestmark = pytest.mark.mounted

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


def test_chain_bootstrap_becomes_full_mesh(swarm: Swarm) -> None:
    a = swarm.add("a")
    b = swarm.add("b", bootstrap=a)
    c = swarm.add("c", bootstrap=b)  # c never hears of a's address from the command line
    for node in (a, b, c):
        node.start()

    swarm.wait_connected([a, b, c])

    for node in (a, b, c):
        status = node.status()
        assert status.keys() >= STATUS_FIELDS, status
        assert status["running"] is True and status["pid"] == node.pid, status
        assert status["listen"] == node.address, status
        assert status["backlog"].keys() >= {"chunks", "bytes", "records"}, status
        connected = [p for p in status["peers"] if p["connected"]]
        others = {n.node_id for n in (a, b, c) if n is not node}
        assert {p["id"] for p in connected} == others, status
        assert len(connected) == 2
        for peer in connected:
            assert peer["last_seen"] is not None and peer["address"], peer
    # each lists the others at their real listen addresses (peer exchange, not guesses)
    by_id = {p["id"]: p["address"] for p in c.status()["peers"]}
    assert by_id[a.node_id] == a.address


def test_node_with_other_swarm_key_is_refused(swarm: Swarm) -> None:
    a = swarm.add("a")
    b = swarm.add("b", bootstrap=a)
    a.start()
    b.start()
    swarm.wait_connected([a, b])
    # A node with a swarm key of its own (made at its first mount) dials both good nodes.
    x = swarm.add("x", bootstrap=[a, b])
    x.swarm_key_file = None
    for node in (a, b, x):
        node.expect_log(r"handshake")
    x.start()
    assert (x.dir / "swarm.key").read_bytes() != swarm.key_file.read_bytes()

    def refused_line(node_log: str) -> list[str]:
        return [
            line
            for line in node_log.splitlines()
            if "handshake" in line and re.search(r"WARNING|ERROR", line)
        ]

    # Both sides have said why, in one line each (and no traceback).
    eventually(lambda: refused_line(x.log_text()), CONNECT_TIMEOUT, "x to log the refusal")
    eventually(lambda: refused_line(a.log_text()), CONNECT_TIMEOUT, "a to log the refusal")
    for node in (a, x):
        lines = refused_line(node.log_text())
        assert "swarm key" in lines[0], lines
        assert "Traceback" not in node.log_text()
    # x says it once per address, not once per retry
    x_lines = refused_line(x.log_text())
    for address in (a.address, b.address):
        assert sum(address in line for line in x_lines) <= 1, x_lines

    # The good nodes keep working and never list x as connected.
    (a.mnt / "after-x.txt").write_text("still working\n")
    eventually(
        lambda: (b.mnt / "after-x.txt").read_text() == "still working\n",
        SYNC_TIMEOUT,
        "a's file on b",
    )
    for node in (a, b):
        status = node.status()
        assert x.node_id not in {p["id"] for p in status["peers"] if p["connected"]}, status
        assert len([p for p in status["peers"] if p["connected"]]) == 1, status
    assert not [p for p in x.status()["peers"] if p["connected"]]
    assert not (x.mnt / "after-x.txt").exists()


def test_restarted_node_reconnects_from_remembered_peers(swarm: Swarm) -> None:
    a, b = swarm.add("a"), swarm.add("b")
    c = swarm.add("c", bootstrap=b)  # learns a only through peer exchange
    for node in (a, b, c):
        node.start()
    swarm.wait_connected([a, b, c])

    c.stop()
    assert not (c.dir / "config.toml").exists()  # nothing on disk holds --bootstrap
    c.start(bootstrap=False)
    assert "--bootstrap" not in c.mount_args

    swarm.wait_connected([a, b, c])
    (c.mnt / "back.txt").write_text("c is back\n")
    for node in (a, b):
        eventually(
            lambda n=node: (n.mnt / "back.txt").read_text() == "c is back\n",
            SYNC_TIMEOUT,
            f"c's file on {node.name}",
        )


def test_listen_port_in_use_fails_mount(swarm: Swarm) -> None:
    node = swarm.add("a")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", node.port))
        holder.listen()
        result = subprocess.run(
            [
                *swarmfs_command(),
                "mount",
                node.mnt,
                "--data-dir",
                node.dir,
                "--listen",
                node.address,
            ],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
    if result.returncode == 0:  # teardown must not leave a node behind
        node.pid = int(node.pid_file.read_text())
        node._started.add(node.pid)
    assert result.returncode != 0, result
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert node.address in message and "in use" in message, message
    assert "Traceback" not in result.stderr
    assert not node.is_mounted()
    pid = node.pid_file.read_text().strip() if node.pid_file.exists() else None
    assert pid is None or not process_alive(int(pid)), f"a node still runs as pid {pid}"
