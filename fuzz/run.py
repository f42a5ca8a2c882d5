"""Run one fuzz target with atheris for a while, growing its corpus in fuzz/corpus/NAME.

    .venv/bin/python fuzz/run.py wire --minutes 10
    .venv/bin/python fuzz/run.py records --minutes 10

A crash leaves ``crash-*`` in the current directory; add the input to the
corpus once fixed so CI replays it (``tests/test_fuzz_corpus.py``).
Needs atheris (``pip install atheris``; in the test extras).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=("wire", "records"))
    parser.add_argument("--minutes", type=float, default=5.0)
    args, extra = parser.parse_known_args()
    import atheris

    with atheris.instrument_imports():
        import targets
    corpus = HERE / "corpus" / args.target
    corpus.mkdir(parents=True, exist_ok=True)
    argv = [sys.argv[0], str(corpus), f"-max_total_time={int(args.minutes * 60)}",
            "-max_len=70000", "-rss_limit_mb=2048", *extra]  # fmt: skip
    atheris.Setup(argv, targets.TARGETS[args.target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
