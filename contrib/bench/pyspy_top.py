"""Summarise py-spy ``--format raw`` profiles: the functions where the samples are.

``bench.py --py-spy DIR`` leaves one collapsed-stack file per measure and node
(``thread;frame;frame;... count`` per line, threads recorded with ``-t``). This
prints, per file, the share of samples by thread, the top functions by own time
(the innermost frame) and by inclusive time (anywhere on the stack), with line
numbers dropped so that one function is one row.

    .venv/bin/python contrib/bench/pyspy_top.py DIR/write-r0-node.txt [--top 15]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

# Innermost frames that are waiting, not working, though py-spy counts them as active:
# trio's event loop in epoll_wait and its idle worker threads waiting for a job.
WAITING = ("EpollIOManager.get_events ", "WorkerThread._work ")
_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def _function(frame: str) -> str:
    """``name (path/to/module.py:123)`` → ``name (module.py)``; other frames as they are."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    name, path = match.groups()
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({short})"


def summarise(
    path: Path, package: str = "swarmfs"
) -> tuple[int, Counter[str], Counter[str], Counter[str]]:
    """Total samples, and counters by thread, own function and inclusive function.

    Samples that only wait (``WAITING``) are counted as such under threads and
    left out of the function counters.

    Inclusive counts only frames of ``package`` (the thread start-up and event
    loop frames under every sample would otherwise fill the list).
    """
    total = 0
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        match = _LINE.match(line.strip())
        if match is None:
            continue
        stack, count = match[1].split(";"), int(match[2])
        total += count
        thread = "(threads not recorded)"
        if stack[0].startswith("thread ("):  # py-spy -t: "thread (TID): NAME"
            thread = re.sub(r"\d+", "N", stack.pop(0).partition(": ")[2])
        if not stack or stack[-1].startswith(WAITING):
            threads["(waiting: event loop or idle worker)"] += count
            continue
        threads[thread] += count
        if stack:
            own[_function(stack[-1])] += count
            ours = {_function(f) for f in stack if f"({package}/" in f or f"/{package}/" in f}
            for name in ours:
                inclusive[name] += count
    return total, threads, own, inclusive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--package", default="swarmfs", help="inclusive time for this package")
    args = parser.parse_args()
    console = Console(highlight=False)
    for path in args.files:
        total, threads, own, inclusive = summarise(path, args.package)
        console.rule(f"{path.name}: {total} samples")
        if not total:
            continue
        tables = (("thread", threads), ("own time", own), (f"inclusive, {args.package}", inclusive))
        for title, counter in tables:
            table = Table(title=title, title_justify="left")
            table.add_column("%", justify="right")
            table.add_column(title)
            for name, count in counter.most_common(args.top):
                table.add_row(f"{100 * count / total:.1f}", name)
            console.print(table)


if __name__ == "__main__":
    main()
