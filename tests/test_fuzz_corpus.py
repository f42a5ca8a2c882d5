"""Replay every saved fuzz input (fuzz/corpus/<target>/*) through its target (fuzz/targets.py).

No atheris needed: the targets are plain functions that may raise only the
errors a hostile peer is allowed to cause (``ProtocolError``,
``InvalidRecord``); anything else fails here. ``fuzz/run.py`` grows the corpus.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
sys.path.insert(0, str(FUZZ))

from targets import TARGETS  # noqa: E402

CASES = sorted(
    (name, path)
    for name in TARGETS
    for path in (FUZZ / "corpus" / name).iterdir()
    if path.is_file()
)


def test_corpus_is_there() -> None:
    for name in TARGETS:
        assert sum(1 for n, _ in CASES if n == name) >= 10, f"corpus for {name} is missing"


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_saved_input(target: str) -> None:
    run = TARGETS[target]
    for name, path in CASES:
        if name == target:
            try:
                run(path.read_bytes())
            except Exception as exc:
                raise AssertionError(f"{path.name}: {exc!r}") from exc
