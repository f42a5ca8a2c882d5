"""swarmfs next to what a user would use instead: passthroughfs, sshfs, Syncthing.

One run measures everything side by side on this machine, on loopback:

- a filesystem through one swarmfs mount, pyfuse3's ``examples/passthroughfs.py``
  (the limit of a pure-Python FUSE filesystem), sshfs to a local sshd, and the
  data dir's own disk: sequential write (``dd bs=1M conv=fsync``), cold read
  (page cache dropped) and warm read; create 10 000 empty files, create
  2 000 × 4 KiB files, and ``rm -rf`` of each;
- replication between two swarmfs nodes next to two Syncthing instances: 1 GiB
  written on A until B reads it back identical, 2 000 small files until all are
  identical on B, then their deletion until all are gone; one TLS connection
  between two Python processes (``tls_throughput.py``) is the ceiling;
- fetch on read (``--replicas 1``): first byte and throughput of ``cat`` of a
  file that lives only on the peer;
- peak RSS (VmHWM) of every node, during the 1 GiB runs and with a 4 GiB file.

Every measure runs ``--rounds`` times (fresh random data each round); ratios are
taken round by round, within the run, because the machine is noisy. The table
shows median, min and max; each target is marked met or not met. A benchmark,
never a test: it needs root (drop_caches, apt-get, sshd) and takes a while.

    sudo .venv/bin/python contrib/bench/bench.py [--quick] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import services
from services import BenchError, Target, WaitTimeout, bounded, wait_until

MiB = 1 << 20
GiB = 1 << 30
SMALL_FILE = 4096
BIG_TIMEOUT = 300.0
"""Bound on waiting for a big file to reach B (seconds; 4 GiB: four times as long)."""
SMALL_TIMEOUT = 60.0
"""Bound on waiting for the small files, or their deletion, to reach B (seconds)."""
COMMAND_TIMEOUT = 600.0
TLS_SCRIPT = Path(__file__).resolve().parent / "tls_throughput.py"
FS_TARGETS = ("swarmfs", "passthroughfs", "sshfs", "disk")

console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


def log(text: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {text}")


# --- sizes and results ---


@dataclass(frozen=True)
class Sizes:
    big: int  # the "1 GiB" file
    empty_files: int
    small_files: int
    huge: int | None  # the "4 GiB" file for peak RSS; None: skipped

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls(big=128 * MiB, empty_files=1000, small_files=200, huge=None)
        return cls(big=GiB, empty_files=10_000, small_files=2000, huge=4 * GiB)


@dataclass(frozen=True)
class Measure:
    key: str
    group: str
    label: str
    unit: str


GROUPS = ("sequential I/O", "metadata", "replication", "fetch on read", "peak RSS")


@dataclass
class Results:
    rounds: int
    measures: dict[str, Measure] = field(default_factory=dict)
    values: dict[str, list[float | None]] = field(default_factory=dict)
    timeouts: dict[str, list[str]] = field(default_factory=dict)

    def record(
        self, key: str, group: str, label: str, unit: str, round_: int, value: float
    ) -> None:
        self.measures.setdefault(key, Measure(key, group, label, unit))
        self.values.setdefault(key, [None] * self.rounds)[round_] = value

    def timed_out(
        self, key: str, group: str, label: str, unit: str, round_: int, error: WaitTimeout
    ) -> None:
        """The measure's wait ran out in this round: no value, a note instead."""
        self.measures.setdefault(key, Measure(key, group, label, unit))
        self.values.setdefault(key, [None] * self.rounds)
        self.timeouts.setdefault(key, []).append(f"round {round_ + 1}: {error}")
        log(f"[yellow]{label}, round {round_ + 1}: {error}[/yellow]")

    def ordered(self) -> list[Measure]:
        keys = list(self.measures)
        return sorted(
            self.measures.values(), key=lambda m: (GROUPS.index(m.group), keys.index(m.key))
        )

    def series(self, key: str) -> list[float | None]:
        return self.values.get(key, [None] * self.rounds)


def summary(values: list[float | None]) -> dict[str, float] | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"median": statistics.median(present), "min": min(present), "max": max(present)}


@dataclass(frozen=True)
class Goal:
    """A target: a ratio per round (or an absolute value), at least ``required``.

    Met when the median over the rounds reaches it (an ``at_most`` limit: when no
    round exceeds it), and swarmfs never timed out in any of its measures.
    """

    label: str
    ratio: Callable[[Results, int], float | None]
    required: float
    swarmfs_keys: tuple[str, ...] = ()
    unit: str = "×"
    at_most: bool = False  # for absolute limits such as peak RSS

    def evaluate(self, results: Results) -> dict:
        values = [self.ratio(results, r) for r in range(results.rounds)]
        stats = summary(values)
        timeouts = sum(len(results.timeouts.get(k, [])) for k in self.swarmfs_keys)
        met = None
        if timeouts:
            met = False
        elif stats is not None:
            met = (
                stats["max"] <= self.required if self.at_most else stats["median"] >= self.required
            )
        return {
            "label": self.label,
            "values": values,
            "summary": stats,
            "required": self.required,
            "unit": self.unit,
            "at_most": self.at_most,
            "swarmfs_timeouts": timeouts,
            "met": met,
        }


def _ratio(num: str, den: str, invert: bool = False) -> Callable[[Results, int], float | None]:
    """num/den in round r (den/num for times: how many times faster ``num`` is)."""

    def ratio(results: Results, r: int) -> float | None:
        a, b = results.series(num)[r], results.series(den)[r]
        if a is None or b is None or (a if invert else b) == 0:
            return None
        return b / a if invert else a / b

    return ratio


def _goal(label: str, num: str, den: str, required: float, invert: bool = False) -> Goal:
    return Goal(label, _ratio(num, den, invert), required, swarmfs_keys=(num,))


def _peak(prefix: str) -> Callable[[Results, int], float | None]:
    def peak(results: Results, r: int) -> float | None:
        found = [results.series(k)[r] for k in results.values if k.startswith(prefix)]
        found = [v for v in found if v is not None]
        return max(found) if found else None

    return peak


GOALS = [
    _goal("write ≥ 0.9× passthroughfs", "write/swarmfs", "write/passthroughfs", 0.9),
    _goal("write ≥ 1.2× sshfs", "write/swarmfs", "write/sshfs", 1.2),
    _goal("cold read ≥ 0.8× passthroughfs", "cold/swarmfs", "cold/passthroughfs", 0.8),
    _goal("warm read ≥ 0.8× passthroughfs warm", "warm/swarmfs", "warm/passthroughfs", 0.8),
    _goal(
        "create empty files: no slower than passthroughfs",
        "create-empty/swarmfs",
        "create-empty/passthroughfs",
        1.0,
        invert=True,
    ),
    _goal(
        "rm -rf empty files: no slower than passthroughfs",
        "rm-empty/swarmfs",
        "rm-empty/passthroughfs",
        1.0,
        invert=True,
    ),
    _goal(
        "create 4 KiB files: no slower than passthroughfs",
        "create-small/swarmfs",
        "create-small/passthroughfs",
        1.0,
        invert=True,
    ),
    _goal(
        "rm -rf 4 KiB files: no slower than passthroughfs",
        "rm-small/swarmfs",
        "rm-small/passthroughfs",
        1.0,
        invert=True,
    ),
    _goal(
        "big file A→B ≥ 2× faster than Syncthing",
        "sync-big/swarmfs",
        "sync-big/syncthing",
        2.0,
        invert=True,
    ),
    _goal("fetch on read ≥ 0.6× the TLS ceiling", "fetch/throughput", "tls/throughput", 0.6),
    _goal(
        "4 KiB files reach B ≥ 5× faster than Syncthing",
        "sync-small/swarmfs",
        "sync-small/syncthing",
        5.0,
        invert=True,
    ),
    _goal(
        "their deletion reaches B ≥ 5× faster than Syncthing",
        "sync-delete/swarmfs",
        "sync-delete/syncthing",
        5.0,
        invert=True,
    ),
    Goal(
        "peak RSS per node, big-file runs ≤ 150 MiB",
        _peak("rss-big/"),
        150.0,
        unit="MiB",
        at_most=True,
    ),
    Goal(
        "peak RSS per node, 4 GiB file ≤ 150 MiB",
        _peak("rss-huge/"),
        150.0,
        unit="MiB",
        at_most=True,
    ),
]


# --- data and timing helpers ---


@dataclass(frozen=True)
class Source:
    path: Path
    size: int
    sha256: str


def fresh_source(directory: Path, name: str, size: int) -> Source:
    """``size`` fresh random bytes in a tmpfs file (so reading it costs no disk)."""
    path = directory / name
    digest = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            block = os.urandom(min(16 * MiB, left))
            digest.update(block)
            f.write(block)
            left -= len(block)
    return Source(path, size, digest.hexdigest())


def timed(
    argv: list[str | Path], cwd: Path | None = None, timeout: float = COMMAND_TIMEOUT
) -> float:
    start = time.perf_counter()
    services.run(argv, timeout=timeout, cwd=cwd)
    return time.perf_counter() - start


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        while block := f.read(MiB):
            digest.update(block)
    return digest.hexdigest()


def rate(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def wait_for_file(path: Path, source: Source, started: float, timeout: float) -> float:
    """Seconds from ``started`` until ``path`` reads back identical to ``source``."""

    def complete() -> bool:
        try:
            if path.stat().st_size != source.size:
                return False
            return sha256_of(path) == source.sha256
        except OSError:  # not there yet, or replaced while we read
            return False

    what = f"{path.name} to arrive complete"
    bounded(what, lambda: wait_until(what, complete, timeout), timeout + 30)
    return time.perf_counter() - started


def wait_for_tree(directory: Path, expected: dict[str, bytes], started: float) -> float:
    """Seconds from ``started`` until every expected file in ``directory`` is identical."""
    pending = dict(expected)

    def complete() -> bool:
        try:
            present = set(os.listdir(directory))
        except OSError:
            return False
        for name in [n for n in pending if n in present]:
            try:
                if (directory / name).read_bytes() == pending[name]:
                    del pending[name]
            except OSError:
                pass
        return not pending

    what = f"{len(expected)} files in {directory.name}"
    bounded(what, lambda: wait_until(what, complete, SMALL_TIMEOUT, poll=0.05), SMALL_TIMEOUT + 30)
    return time.perf_counter() - started


def wait_gone(path: Path, started: float) -> float:
    what = f"{path.name} to disappear"
    bounded(
        what, lambda: wait_until(what, lambda: not path.exists(), SMALL_TIMEOUT), SMALL_TIMEOUT + 30
    )
    return time.perf_counter() - started


def wait_size(path: Path, size: int) -> None:
    """Until ``path`` exists with ``size`` bytes (its record has arrived)."""
    what = f"{path.name} to appear"
    bounded(
        what,
        lambda: wait_until(what, lambda: _size(path) == size, SMALL_TIMEOUT),
        SMALL_TIMEOUT + 30,
    )


def split_names(count: int) -> list[str]:
    return [f"f{i:05d}" for i in range(count)]


def write_small_files(source: Source, count: int, directory: Path) -> float:
    """``split`` ``source`` into ``count`` files of 4 KiB in ``directory``; seconds taken."""
    directory.mkdir()
    return timed(["split", "-b", str(SMALL_FILE), "-a", "5", "-d", source.path, directory / "f"])


def small_expected(source: Source, count: int) -> dict[str, bytes]:
    data = source.path.read_bytes()
    return {
        name: data[i * SMALL_FILE : (i + 1) * SMALL_FILE]
        for i, name in enumerate(split_names(count))
    }


# --- profiling (optional) ---


class Profiler:
    """With ``--py-spy DIR``: a py-spy recording of the given nodes around each measure."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if directory is not None:
            if not Path(self.py_spy).exists():
                raise BenchError("--py-spy needs py-spy: .venv/bin/pip install py-spy")
            directory.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def __call__(self, name: str, pids: dict[str, int]) -> Iterator[None]:
        if self.directory is None:
            yield
            return
        procs = []
        for node, pid in pids.items():
            out = self.directory / f"{name}-{node}.txt"
            procs.append(
                subprocess.Popen(
                    [
                        self.py_spy,
                        "record",
                        "-p",
                        str(pid),
                        "-f",
                        "raw",
                        "-r",
                        "200",
                        "--nonblocking",
                        "--threads",
                        "-o",
                        str(out),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(0.5)  # let py-spy attach before the measure starts
        try:
            yield
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
            for proc in procs:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# --- the measures ---


@dataclass
class Bench:
    sizes: Sizes
    results: Results
    workdir: Path
    shm: Path
    profile: Profiler
    passthroughfs_script: Path | None = None

    def fs_phase(self) -> None:
        """Write, cold and warm read, creates and rm -rf on the four local targets."""
        big = self.sizes.big
        with contextlib.ExitStack() as stack:
            root = self.workdir / "fs"
            targets: list[Target] = [
                stack.enter_context(services.swarmfs_single(root / "swarmfs")),
                stack.enter_context(
                    services.passthroughfs(
                        self.passthroughfs_script, root / "pt-src", root / "pt-mnt"
                    )
                ),
            ]
            port, key = stack.enter_context(services.sshd(root / "sshd"))
            targets.append(
                stack.enter_context(
                    services.sshfs(port, key, root / "sshfs-src", root / "sshfs-mnt")
                )
            )
            targets.append(stack.enter_context(services.plain_dir("disk", root / "disk")))
            swarm_pid = targets[0].pid
            for r in range(self.results.rounds):
                order = targets[r % len(targets) :] + targets[: r % len(targets)]
                source = fresh_source(self.shm, "seq", big)
                services.reset_peak_rss(swarm_pid)
                for t in order:
                    self._sequential(t, source, r)
                self.results.record(
                    "rss-big/fs",
                    "peak RSS",
                    "swarmfs node, write and read",
                    "MiB",
                    r,
                    services.peak_rss(swarm_pid) / MiB,
                )
                source.path.unlink()
                small = fresh_source(self.shm, "small", self.sizes.small_files * SMALL_FILE)
                for t in order:
                    self._metadata(t, small, r)
                small.path.unlink()
                log(
                    f"fs round {r + 1}: "
                    + ", ".join(
                        f"{t.name} write {self.results.series('write/' + t.name)[r]:.0f} MB/s"
                        for t in targets
                    )
                )

    def _sequential(self, t: Target, source: Source, r: int) -> None:
        group = "sequential I/O"
        path = t.path / f"seq-{r}"
        pids = {"node": t.pid} if t.name == "swarmfs" else {}
        with self.profile(f"write-r{r}", pids):
            seconds = timed(
                ["dd", f"if={source.path}", f"of={path}", "bs=1M", "conv=fsync", "status=none"]
            )
        self.results.record(
            f"write/{t.name}", group, f"write {t.name}", "MB/s", r, rate(source.size, seconds)
        )
        drop_caches()
        with self.profile(f"cold-read-r{r}", pids):
            seconds = timed(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"])
        self.results.record(
            f"cold/{t.name}", group, f"cold read {t.name}", "MB/s", r, rate(source.size, seconds)
        )
        with self.profile(f"warm-read-r{r}", pids):
            seconds = timed(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"])
        self.results.record(
            f"warm/{t.name}", group, f"warm read {t.name}", "MB/s", r, rate(source.size, seconds)
        )
        path.unlink()

    def _metadata(self, t: Target, small: Source, r: int) -> None:
        n, m = self.sizes.empty_files, self.sizes.small_files
        group = "metadata"
        pids = {"node": t.pid} if t.name == "swarmfs" else {}
        empty = t.path / f"empty-{r}"
        empty.mkdir()
        with self.profile(f"create-empty-r{r}", pids):
            seconds = timed(["touch", *split_names(n)], cwd=empty)
        self.results.record(
            f"create-empty/{t.name}", group, f"create {n} empty files, {t.name}", "s", r, seconds
        )
        with self.profile(f"rm-empty-r{r}", pids):
            seconds = timed(["rm", "-rf", empty])
        self.results.record(
            f"rm-empty/{t.name}", group, f"rm -rf {n} empty files, {t.name}", "s", r, seconds
        )
        directory = t.path / f"small-{r}"
        with self.profile(f"create-small-r{r}", pids):
            seconds = write_small_files(small, m, directory)
        self.results.record(
            f"create-small/{t.name}", group, f"create {m} × 4 KiB files, {t.name}", "s", r, seconds
        )
        with self.profile(f"rm-small-r{r}", pids):
            seconds = timed(["rm", "-rf", directory])
        self.results.record(
            f"rm-small/{t.name}", group, f"rm -rf {m} × 4 KiB files, {t.name}", "s", r, seconds
        )

    def sync_phase(self) -> None:
        """A→B replication: a swarmfs pair next to a Syncthing pair, round by round.

        First every round of the big file, then every round of the small files. A
        swarmfs pair whose wait timed out is replaced by a fresh one for the next
        round, so that one stuck round does not decide the others.
        """
        root = self.workdir / "sync"
        with (
            contextlib.ExitStack() as stack,
            services.syncthing_pair(root / "syncthing") as (sa, sb),
        ):
            pairs = 0

            def new_pair() -> tuple[services.SwarmNode, services.SwarmNode]:
                nonlocal pairs, stack
                stack.close()
                stack = contextlib.ExitStack()
                pairs += 1
                return stack.enter_context(services.swarm(root / f"swarmfs-{pairs}", ["a", "b"]))

            try:
                a, b = new_pair()
                for r in range(self.results.rounds):
                    source = fresh_source(self.shm, "big", self.sizes.big)
                    for node in (a, b):
                        services.reset_peak_rss(node.pid)
                    with self.profile(f"sync-big-r{r}", {"a": a.pid, "b": b.pid}):
                        ok = self._sync_big("swarmfs", a.mountpoint, b.mountpoint, source, r, None)
                    for node in (a, b):
                        self.results.record(
                            f"rss-big/{node.name}",
                            "peak RSS",
                            f"swarmfs node {node.name.upper()}, big file A→B",
                            "MiB",
                            r,
                            services.peak_rss(node.pid) / MiB,
                        )
                    self._sync_big("syncthing", sa.folder, sb.folder, source, r, sa)
                    source.path.unlink()
                    log(f"big file round {r + 1}: {self._fmt('sync-big', r)}")
                    if not ok:
                        a, b = new_pair()
                for r in range(self.results.rounds):
                    small = fresh_source(self.shm, "small", self.sizes.small_files * SMALL_FILE)
                    expected = small_expected(small, self.sizes.small_files)
                    with self.profile(f"sync-small-r{r}", {"a": a.pid, "b": b.pid}):
                        ok = self._sync_small(
                            "swarmfs", a.mountpoint, b.mountpoint, small, expected, r, None
                        )
                    self._sync_small("syncthing", sa.folder, sb.folder, small, expected, r, sa)
                    small.path.unlink()
                    log(
                        f"small files round {r + 1}: {self._fmt('sync-small', r)}; "
                        f"deletion {self._fmt('sync-delete', r)}"
                    )
                    if not ok:
                        a, b = new_pair()
            finally:
                stack.close()

    def _fmt(self, prefix: str, r: int) -> str:
        parts = []
        for name in ("swarmfs", "syncthing"):
            value = self.results.series(f"{prefix}/{name}")[r]
            parts.append(f"{name} " + ("timed out" if value is None else f"{value:.2f} s"))
        return " vs ".join(parts)

    def _sync_big(
        self,
        name: str,
        src_dir: Path,
        dst_dir: Path,
        source: Source,
        r: int,
        syncthing: services.SyncthingNode | None,
    ) -> bool:
        """Write on A, wait until B reads it back identical; False if the wait timed out."""
        path = f"big-{r}"
        label = f"{source.size // MiB} MiB"
        seconds = timed(
            [
                "dd",
                f"if={source.path}",
                f"of={src_dir / path}",
                "bs=1M",
                "conv=fsync",
                "status=none",
            ]
        )
        self.results.record(
            f"sync-big-write/{name}", "replication", f"write {label} on A, {name}", "s", r, seconds
        )
        started = time.perf_counter()
        if syncthing is not None:
            syncthing.rescan()
        key, measure = f"sync-big/{name}", f"{label} A→B after the copy, {name}"
        try:
            elapsed = wait_for_file(dst_dir / path, source, started, BIG_TIMEOUT)
        except WaitTimeout as exc:
            self.results.timed_out(key, "replication", measure, "s", r, exc)
            return False
        self.results.record(key, "replication", measure, "s", r, elapsed)
        (src_dir / path).unlink()
        if syncthing is not None:
            syncthing.rescan()
        try:
            wait_gone(dst_dir / path, time.perf_counter())
        except WaitTimeout as exc:
            log(f"[yellow]{name}: the big file's deletion, round {r + 1}: {exc}[/yellow]")
            return False
        return True

    def _sync_small(
        self,
        name: str,
        src_dir: Path,
        dst_dir: Path,
        small: Source,
        expected: dict[str, bytes],
        r: int,
        syncthing: services.SyncthingNode | None,
    ) -> bool:
        """The small files A→B, then their deletion; False if a wait timed out."""
        m = len(expected)
        directory = f"small-{r}"
        seconds = write_small_files(small, m, src_dir / directory)
        self.results.record(
            f"sync-small-write/{name}",
            "replication",
            f"write {m} × 4 KiB files on A, {name}",
            "s",
            r,
            seconds,
        )
        started = time.perf_counter()
        if syncthing is not None:
            syncthing.rescan()
        ok = True
        key, measure = f"sync-small/{name}", f"{m} × 4 KiB files A→B, {name}"
        try:
            self.results.record(
                key,
                "replication",
                measure,
                "s",
                r,
                wait_for_tree(dst_dir / directory, expected, started),
            )
        except WaitTimeout as exc:
            self.results.timed_out(key, "replication", measure, "s", r, exc)
            ok = False
        services.run(["rm", "-rf", src_dir / directory])
        started = time.perf_counter()
        if syncthing is not None:
            syncthing.rescan()
        key, measure = f"sync-delete/{name}", f"their deletion A→B, {name}"
        try:
            self.results.record(
                key, "replication", measure, "s", r, wait_gone(dst_dir / directory, started)
            )
        except WaitTimeout as exc:
            self.results.timed_out(key, "replication", measure, "s", r, exc)
            ok = False
        return ok

    def fetch_phase(self) -> None:
        """Fetch on read with --replicas 1, next to the TLS ceiling, round by round."""
        root = self.workdir / "fetch"
        with services.swarm(root, ["c", "d"], replicas="1") as (c, d):
            for r in range(self.results.rounds):
                self._tls_ceiling(r)
                source = fresh_source(self.shm, "big", self.sizes.big)
                path = f"fetch-{r}"
                services.run(
                    [
                        "dd",
                        f"if={source.path}",
                        f"of={c.mountpoint / path}",
                        "bs=1M",
                        "conv=fsync",
                        "status=none",
                    ]
                )
                source.path.unlink()
                label = f"cat of {source.size // MiB} MiB held by the peer"
                try:
                    wait_size(d.mountpoint / path, source.size)
                except WaitTimeout as exc:
                    self.results.timed_out(
                        "fetch/throughput", "fetch on read", f"{label}: throughput", "MB/s", r, exc
                    )
                    continue
                for node in (c, d):
                    services.reset_peak_rss(node.pid)
                with self.profile(f"fetch-r{r}", {"c": c.pid, "d": d.pid}):
                    first, total = cat(d.mountpoint / path)
                if sha256_of(d.mountpoint / path) != source.sha256:
                    raise BenchError(f"fetched {path} differs from what was written")
                self.results.record(
                    "fetch/first-byte",
                    "fetch on read",
                    f"{label}: first byte",
                    "ms",
                    r,
                    first * 1000,
                )
                self.results.record(
                    "fetch/throughput",
                    "fetch on read",
                    f"{label}: throughput",
                    "MB/s",
                    r,
                    rate(source.size, total),
                )
                for node in (c, d):
                    self.results.record(
                        f"rss-big/{node.name}",
                        "peak RSS",
                        f"swarmfs node {node.name.upper()}, fetch on read",
                        "MiB",
                        r,
                        services.peak_rss(node.pid) / MiB,
                    )
                log(
                    f"fetch round {r + 1}: first byte {first * 1000:.0f} ms, "
                    f"{rate(source.size, total):.0f} MB/s; TLS ceiling "
                    f"{self.results.series('tls/throughput')[r]:.0f} MB/s"
                )

    def _tls_ceiling(self, r: int) -> None:
        size_mib = self.sizes.big // MiB
        out = services.run([sys.executable, TLS_SCRIPT, "--size-mib", str(size_mib)]).stdout
        for label, key in (("plain TCP", "tcp"), ("TLS 1.3 + frame decode", "tls")):
            match = re.search(
                rf"^{re.escape(label)}\s.*?([\d.]+) s\s+([\d.]+) MB/s$", out, re.MULTILINE
            )
            if match is None:
                raise BenchError(f"unexpected output from {TLS_SCRIPT.name}: {out!r}")
            self.results.record(
                f"{key}/throughput",
                "fetch on read",
                f"{size_mib} MiB over one {label} connection, two processes",
                "MB/s",
                r,
                float(match[2]),
            )

    def huge_phase(self) -> None:
        """Peak RSS of both nodes while a 4 GiB file goes A→B (a fresh pair each round)."""
        assert self.sizes.huge is not None
        label = f"{self.sizes.huge // GiB} GiB"
        for r in range(self.results.rounds):
            source = fresh_source(self.shm, "huge", self.sizes.huge)
            root = self.workdir / f"huge-{r}"
            with services.swarm(root, ["a", "b"]) as (a, b):
                with self.profile(f"huge-r{r}", {"a": a.pid, "b": b.pid}):
                    seconds = timed(
                        [
                            "dd",
                            f"if={source.path}",
                            f"of={a.mountpoint / 'huge'}",
                            "bs=1M",
                            "conv=fsync",
                            "status=none",
                        ]
                    )
                    try:
                        elapsed = wait_for_file(
                            b.mountpoint / "huge", source, time.perf_counter(), 4 * BIG_TIMEOUT
                        )
                    except WaitTimeout as exc:
                        self.results.timed_out(
                            "huge-sync", "peak RSS", f"{label} A→B after the copy", "s", r, exc
                        )
                        elapsed = None
                self.results.record(
                    "huge-write", "peak RSS", f"write {label} on A", "s", r, seconds
                )
                if elapsed is not None:
                    self.results.record(
                        "huge-sync", "peak RSS", f"{label} A→B after the copy", "s", r, elapsed
                    )
                for node in (a, b):
                    self.results.record(
                        f"rss-huge/{node.name}",
                        "peak RSS",
                        f"swarmfs node {node.name.upper()}, {label} file A→B",
                        "MiB",
                        r,
                        services.peak_rss(node.pid) / MiB,
                    )
            source.path.unlink()
            shutil.rmtree(root, ignore_errors=True)
            log(
                f"{label} round {r + 1}: write {seconds:.1f} s, then A→B "
                + ("timed out" if elapsed is None else f"{elapsed:.1f} s")
            )


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def cat(path: Path) -> tuple[float, float]:
    """``cat path``: seconds to the first byte and to the last. What came is thrown away:
    hashing it here (0.54 ms per MiB) would compete with the nodes measured for the two
    cores; the caller checks the content afterwards."""
    start = time.perf_counter()
    proc = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE, bufsize=0)
    assert proc.stdout is not None
    # A 1 MiB pipe: with the default 64 KiB, cat and this process woke each other 16
    # times per MiB, on the two cores the nodes measured need.
    fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, MiB)
    watchdog = threading.Timer(BIG_TIMEOUT, proc.kill)  # a stuck read ends the cat
    watchdog.start()
    first = None
    try:
        while proc.stdout.read(MiB):
            if first is None:
                first = time.perf_counter() - start
        if proc.wait(timeout=BIG_TIMEOUT) != 0:
            raise BenchError(f"cat {path} failed with {proc.returncode}")
    finally:
        watchdog.cancel()
        services.stop_process(proc)
    total = time.perf_counter() - start
    return (first if first is not None else total), total


# --- report ---


def _fmt_value(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def report(results: Results, goals: list[dict], title: str) -> None:
    table = Table(title=title, show_lines=False)
    for column, justify in (
        ("measure", "left"),
        ("unit", "left"),
        ("median", "right"),
        ("min", "right"),
        ("max", "right"),
        ("rounds", "right"),
    ):
        table.add_column(column, justify=justify)
    group = None
    for measure in results.ordered():
        values = results.values[measure.key]
        stats = summary(values)
        if measure.group != group:
            group = measure.group
            table.add_section()
            table.add_row(f"[bold]{group}[/bold]")
        timeouts = len(results.timeouts.get(measure.key, []))
        counted = f"{sum(v is not None for v in values)}/{results.rounds}"
        if timeouts:
            counted += f" [red]({timeouts} timed out)[/red]"
        cells = (
            ["-"] * 3 if stats is None else [_fmt_value(stats[k]) for k in ("median", "min", "max")]
        )
        table.add_row(measure.label, measure.unit, *cells, counted)
    console.print(table)

    targets = Table(title="targets (ratios taken round by round, then their median)")
    for column, justify in (
        ("target", "left"),
        ("median", "right"),
        ("min", "right"),
        ("max", "right"),
        ("", "left"),
    ):
        targets.add_column(column, justify=justify)
    for goal in goals:
        stats = goal["summary"]
        unit = "" if goal["unit"] == "×" else f" {goal['unit']}"
        cells = (
            ["-"] * 3
            if stats is None
            else [f"{stats[k]:.2f}{unit}" for k in ("median", "min", "max")]
        )
        if goal["met"] is None:
            mark = "[dim]not measured[/dim]"
        elif goal["met"]:
            mark = "[green]met[/green]"
        else:
            mark = "[red]not met[/red]"
            if goal["swarmfs_timeouts"]:
                mark += f" (swarmfs timed out {goal['swarmfs_timeouts']}×)"
        targets.add_row(goal["label"], *cells, mark)
    console.print(targets)


# --- main ---

PHASES = ("fs", "sync", "fetch", "huge")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="times each measure runs (≥ 1)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller sizes (128 MiB, 1 000 and 200 files; no 4 GiB run)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--only", action="append", choices=PHASES, help="run only this phase (repeatable)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp"),
        help="where data dirs and mounts go, on the disk measured (default /var/tmp)",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="record py-spy profiles of the swarmfs nodes into DIR"
        " (slows the run: compare timings from a run without it)",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if os.geteuid() != 0:
        print("bench.py: needs root (drop_caches, sshd, apt-get)", file=sys.stderr)
        return 2

    sizes = Sizes.for_mode(args.quick)
    phases = [
        p
        for p in PHASES
        if (args.only is None or p in args.only) and not (p == "huge" and sizes.huge is None)
    ]
    results = Results(args.rounds)
    started = time.time()
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        services.ensure_apt_packages(log)
        with (
            tempfile.TemporaryDirectory(prefix="swarmfs-bench-", dir=args.workdir) as work,
            tempfile.TemporaryDirectory(prefix="swarmfs-bench-", dir="/dev/shm") as shm,
        ):
            bench = Bench(sizes, results, Path(work), Path(shm), Profiler(args.py_spy))
            if "fs" in phases:
                bench.passthroughfs_script = services.fetch_passthroughfs(Path(work))
            for phase in phases:
                log(f"phase {phase}")
                getattr(bench, f"{phase}_phase")()
    except BenchError as exc:
        console.print(f"[red]bench.py: {exc}[/red]")
        status = 1
    except KeyboardInterrupt:
        console.print("[red]bench.py: interrupted[/red]")
        status = 130
    else:
        status = 0

    goals = [g.evaluate(results) for g in GOALS]
    mode = "quick" if args.quick else "full"
    report(
        results,
        goals,
        f"swarmfs benchmark ({mode}, {args.rounds} rounds, {time.time() - started:.0f} s)",
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "mode": mode,
                    "rounds": args.rounds,
                    "sizes": dataclasses.asdict(sizes),
                    "machine": {
                        "cpus": os.cpu_count(),
                        "kernel": platform.release(),
                        "python": platform.python_version(),
                    },
                    "seconds": round(time.time() - started, 1),
                    "complete": status == 0,
                    "measures": {
                        k: {
                            "group": m.group,
                            "label": m.label,
                            "unit": m.unit,
                            "values": results.values[k],
                            **(summary(results.values[k]) or {}),
                        }
                        for k, m in results.measures.items()
                    },
                    "targets": goals,
                },
                indent=2,
            )
            + "\n"
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
