"""``python -m swarmfs`` is the same as the ``swarmfs`` command."""

from swarmfs.cli import main

raise SystemExit(main())
