"""The node's configuration: one frozen, typed object with units.

Values come from ``DIR/config.toml`` overlaid by the command line (the command
line wins, a repeated option such as ``--bootstrap`` replacing the file's whole
list). Every option is declared once, in ``OPTIONS``: the CLI builds its flags
from that table and the loader accepts exactly its keys, so the two cannot
drift apart. ``--foreground`` is not a key: it says how one invocation runs,
not what the node is.

Units: sizes are bytes (``cache_size = "10G"``: K/M/G/T and KiB/MiB/GiB/TiB are
powers of 1024, kB/MB/GB/TB powers of 1000, a plain number is bytes);
durations are seconds (``trash_retention = "7d"``: s/m/h/d suffixes, or a
plain number). A relative path in config.toml is relative to the data dir; on
the command line, to the working directory.

Pure and synchronous; nothing here touches the network or the filesystem
except reading config.toml.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import platformdirs

from swarmfs.errors import UserError

CONFIG_FILE_NAME = "config.toml"
DATA_DIR_ENV = "SWARMFS_DATA_DIR"

GiB = 1024**3
DAY = 24 * 3600

FUSE_OPTIONS = frozenset({"allow_other", "default_permissions", "ro", "noatime", "nosuid", "nodev"})
"""The ``-o`` options swarmfs passes to the kernel; any other makes ``pyfuse3.init`` fail."""


class Address(NamedTuple):
    """A (host, port) pair; still a tuple, so it can be splatted into socket calls."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


DEFAULT_LISTEN = Address("0.0.0.0", 3000)


@dataclass(frozen=True)
class Config:
    """Everything a node needs to start, already validated and in base units."""

    data_dir: Path
    listen: Address = DEFAULT_LISTEN
    bootstrap: tuple[Address, ...] = ()
    swarm_key_file: Path | None = None
    replicas: int | None = 3
    """How many nodes hold each chunk, this one included; None means every node."""
    cache_size: int = 10 * GiB
    """Bytes of unpinned (fetched) chunks kept before LRU eviction."""
    fuse_options: frozenset[str] = field(default_factory=frozenset)
    trash_retention: int = 7 * DAY
    """Seconds a deleted file's chunks stay restorable."""
    log_level: int = logging.INFO


# --- value parsers: each takes a TOML value or a command-line string, raises ValueError ---

_ADDRESS_RE = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d+)$")


def parse_address(text: object, *, allow_port_zero: bool = False) -> Address:
    """``host:port`` or ``[v6addr]:port``."""
    if not isinstance(text, str):
        raise ValueError(f"expected 'HOST:PORT', got {text!r}")
    match = _ADDRESS_RE.match(text.strip())
    if match is None:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    port = int(match["port"])
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return Address(match["v6"] or match["host"], port)


def _parse_listen(value: object) -> Address:
    # Port 0 lets the kernel choose, which tests and ad-hoc nodes rely on.
    return parse_address(value, allow_port_zero=True)


def _items(value: object) -> list[str]:
    """A list option's items: a TOML list or comma-separated string(s)."""
    raw = value if isinstance(value, list) else [value]
    items: list[str] = []
    for item in raw:
        if not isinstance(item, str):
            raise ValueError(f"expected strings, got {item!r}")
        items.extend(part.strip() for part in item.split(",") if part.strip())
    return items


def _parse_bootstrap(value: object) -> tuple[Address, ...]:
    return tuple(parse_address(item) for item in _items(value))


def _parse_path(value: object) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a path, got {value!r}")
    return Path(value).expanduser()


def _parse_replicas(value: object) -> int | None:
    if value == "all":
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"expected a positive number or 'all', got {value!r}")


_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)$", re.IGNORECASE)
_SIZE_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(value: object) -> int:
    """Bytes from ``10G``, ``512M``, ``1GiB``, ``5GB`` (decimal) or a plain number."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE_RE.match(value.strip()) if isinstance(value, str) else None
    if match is None or (not match[2] and "i" in match[3].lower()):
        raise ValueError(f"expected a size such as 512M or 10GiB, got {value!r}")
    number, prefix, suffix = match.groups()
    base = 1000 if suffix.lower() == "b" and prefix else 1024
    return int(float(number) * base ** _SIZE_POWER[prefix.lower()])


_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$", re.IGNORECASE)
_DURATION_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": DAY}


def parse_duration(value: object) -> int:
    """Seconds from ``7d``, ``12h``, ``30m``, ``45s`` or a plain number."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _DURATION_RE.match(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"expected a duration such as 7d or 12h, got {value!r}")
    return math.ceil(float(match[1]) * _DURATION_UNIT[match[2].lower()])


def parse_fuse_options(value: object) -> frozenset[str]:
    options = frozenset(_items(value))
    for option in sorted(options):
        if option not in FUSE_OPTIONS:
            allowed = ", ".join(sorted(FUSE_OPTIONS))
            raise ValueError(f"unsupported mount option {option!r} (allowed: {allowed})")
    return options


_LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _parse_log_level(value: object) -> int:
    level = _LOG_LEVELS.get(value.lower()) if isinstance(value, str) else None
    if level is None:
        raise ValueError(f"expected one of {', '.join(_LOG_LEVELS)}, got {value!r}")
    return level


@dataclass(frozen=True)
class Option:
    """One setting: its config.toml key (= Config field) and, if any, its command-line flags."""

    key: str
    parse: Callable[[Any], object]
    flags: tuple[str, ...] = ()
    metavar: str = ""
    help: str = ""
    repeat: bool = False
    """Given several times on the command line, the values form one list."""


OPTIONS: tuple[Option, ...] = (
    Option(
        "listen",
        _parse_listen,
        ("--listen",),
        "HOST:PORT",
        "address peers connect to (default 0.0.0.0:3000)",
    ),
    Option(
        "bootstrap",
        _parse_bootstrap,
        ("--bootstrap",),
        "HOST:PORT",
        "a peer to join through; repeatable",
        repeat=True,
    ),
    Option(
        "swarm_key_file",
        _parse_path,
        ("--swarm-key-file",),
        "FILE",
        "the swarm's key (default: DIR/swarm.key, created if missing)",
    ),
    Option(
        "replicas",
        _parse_replicas,
        ("--replicas",),
        "N|all",
        "nodes that hold each chunk, this one included (default 3)",
    ),
    Option(
        "cache_size",
        parse_size,
        ("--cache-size",),
        "SIZE",
        "room for chunks fetched from peers, e.g. 512M, 10G (default 10G)",
    ),
    Option(
        "fuse_options",
        parse_fuse_options,
        ("-o",),
        "OPT,...",
        "FUSE options: " + ", ".join(sorted(FUSE_OPTIONS)),
        repeat=True,
    ),
    Option("trash_retention", parse_duration),
    Option("log_level", _parse_log_level),
)
_BY_KEY = {option.key: option for option in OPTIONS}


def default_data_dir() -> Path:
    """``$SWARMFS_DATA_DIR``, else the platform's per-user data dir."""
    from_env = os.environ.get(DATA_DIR_ENV)
    return Path(from_env) if from_env else platformdirs.user_data_path("swarmfs")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid TOML ({exc})") from None


def _parse(option: Option, raw: object, source: str, base: Path) -> object:
    try:
        value = option.parse(raw)
    except ValueError as exc:
        raise UserError(f"{source}: {exc}") from None
    return base / value if isinstance(value, Path) else value


def load_config(data_dir: Path, overrides: Mapping[str, object] | None = None) -> Config:
    """The data dir's config.toml overlaid by ``overrides`` (command-line values).

    ``overrides`` maps option keys to raw command-line values; None means "not
    given" and leaves the file's value in place.
    """
    data_dir = data_dir.absolute()
    config_file = data_dir / CONFIG_FILE_NAME
    values: dict[str, object] = {}
    for key, raw in _read_toml(config_file).items():
        option = _BY_KEY.get(key)
        if option is None:
            known = ", ".join(_BY_KEY)
            raise UserError(f"{config_file}: unknown key {key!r} (known: {known})")
        values[key] = _parse(option, raw, f"{config_file}: {key}", data_dir)
    for key, raw in (overrides or {}).items():
        if raw is not None:
            option = _BY_KEY[key]
            source = option.flags[0] if option.flags else key
            values[key] = _parse(option, raw, source, Path.cwd())
    return Config(data_dir=data_dir, **values)  # type: ignore[arg-type]
