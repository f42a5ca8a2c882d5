"""Join tokens: ``swarmfs invite`` on a member, ``swarmfs join TOKEN`` on a newcomer.

A token is ``swarmfs1:`` followed by base64url (no padding) of::

    swarm key (32 bytes) ‖ addresses (UTF-8, comma-separated HOST:PORT) ‖ SHA-256(…)[:4]

The four check bytes catch a token cut short or mistyped while pasting; the
``1`` in the prefix is the format version. The token holds the swarm key, so
it is a secret: whoever has it is a member (DESIGN.md §4).

The addresses are where the inviting node can be reached: the running node's
bound listen address (its config's when offline), with a wildcard host
(``0.0.0.0``/``::``) replaced by this machine's addresses, non-loopback first,
loopback last (a joiner on the same machine; on another machine a loopback
address just fails to connect, or reaches the joiner itself, which membership
recognises and skips).

``join`` writes the key into the data dir (refusing a dir that belongs to
another swarm) and adds the addresses to the ``bootstrap`` list of
``DIR/config.toml``, editing only that key's lines so comments and other keys
stay as they were.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
import socket
import tomllib
from pathlib import Path

from swarmfs import control
from swarmfs.config import Address, load_config, parse_address
from swarmfs.crypto.keys import SWARM_KEY_BYTES, encode_swarm_key, write_secret
from swarmfs.datadir import DataDir
from swarmfs.errors import UserError

PREFIX = "swarmfs1:"
_CHECK_BYTES = 4
STATUS_TIMEOUT = 5.0

WILDCARDS = frozenset({"0.0.0.0", "::"})


def encode_token(swarm_key: bytes, addresses: list[Address]) -> str:
    body = swarm_key + ",".join(str(a) for a in addresses).encode()
    raw = body + hashlib.sha256(body).digest()[:_CHECK_BYTES]
    return PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_token(token: str) -> tuple[bytes, list[Address]]:
    """(swarm key, addresses); a malformed token is a one-line UserError."""
    token = token.strip()
    if not token.startswith(PREFIX):
        raise UserError(f"not a swarmfs join token (it should start with {PREFIX!r})")
    text = token.removeprefix(PREFIX)
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (ValueError, binascii.Error):
        raise UserError("malformed join token: not base64url") from None
    body, check = raw[:-_CHECK_BYTES], raw[-_CHECK_BYTES:]
    if len(body) < SWARM_KEY_BYTES or hashlib.sha256(body).digest()[:_CHECK_BYTES] != check:
        raise UserError("malformed join token: it was cut short or mistyped")
    key, listed = body[:SWARM_KEY_BYTES], body[SWARM_KEY_BYTES:]
    try:
        addresses = [parse_address(a) for a in listed.decode().split(",") if a]
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"malformed join token: {exc}") from None
    if not addresses:
        raise UserError("malformed join token: it names no address to join through")
    return key, addresses


# --- invite ---


def invite_token(data_dir: DataDir) -> str:
    """The token for the node on ``data_dir``, running or not."""
    key = data_dir.swarm_key()
    try:
        listen = parse_address(
            control.request(data_dir, {"cmd": "status"}, STATUS_TIMEOUT)["listen"]
        )
    except control.NodeNotRunning:
        listen = load_config(data_dir.path).listen
        if listen.port == 0:
            raise UserError(
                "the node is not running and listens on port 0 (chosen at start):"
                " start it first, or set a fixed --listen port"
            ) from None
    return encode_token(key, reachable(listen))


def reachable(listen: Address) -> list[Address]:
    """Where peers can dial a node bound to ``listen``."""
    if listen.host not in WILDCARDS:
        return [listen]
    v6 = listen.host == "::"
    hosts = [h for h in local_addresses(include_v6=v6) if not ipaddress.ip_address(h).is_loopback]
    hosts += ["127.0.0.1", "::1"] if v6 else ["127.0.0.1"]
    return [Address(h, listen.port) for h in hosts]


_FIB_LOCAL = re.compile(r"\|-- (\d+\.\d+\.\d+\.\d+)\n\s+/32 host LOCAL")


def local_addresses(*, include_v6: bool) -> list[str]:
    """This machine's unicast addresses, in a stable order.

    Linux lists every local IPv4 address in ``/proc/net/fib_trie`` and IPv6 in
    ``/proc/net/if_inet6``; elsewhere, what the host name resolves to.
    """
    found: list[str] = []
    try:
        found += _FIB_LOCAL.findall(Path("/proc/net/fib_trie").read_text())
        if include_v6:
            for line in Path("/proc/net/if_inet6").read_text().splitlines():
                fields = line.split()
                address = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
                if not address.is_link_local:  # would need a scope id to dial
                    found.append(str(address))
    except OSError:
        family = socket.AF_UNSPEC if include_v6 else socket.AF_INET
        try:
            infos = socket.getaddrinfo(socket.gethostname(), None, family)
        except OSError:
            infos = []
        found += [str(info[4][0]) for info in infos]
    return [a for a in dict.fromkeys(found) if not ipaddress.ip_address(a).is_unspecified]


# --- join ---


def join(data_dir: DataDir, token: str) -> list[Address]:
    """Store the token's key and addresses in ``data_dir``; returns the bootstrap list."""
    key, addresses = decode_token(token)
    data_dir.create()
    if data_dir.swarm_key_file.exists():
        if data_dir.swarm_key() != key:
            raise UserError(
                f"data dir {data_dir.path} belongs to another swarm (its swarm.key differs);"
                " join with a new --data-dir"
            )
    else:
        write_secret(data_dir.swarm_key_file, encode_swarm_key(key))
    data_dir.init()  # the node identity, if missing
    known = load_config(data_dir.path).bootstrap
    merged = list(dict.fromkeys([*addresses, *known]))
    set_bootstrap(data_dir.config_file, merged)
    return merged


def set_bootstrap(config_file: Path, addresses: list[Address]) -> None:
    """Replace the top-level ``bootstrap`` assignment of a TOML file, keeping every other line."""
    line = "bootstrap = [" + ", ".join(f'"{a}"' for a in addresses) + "]\n"
    try:
        old = config_file.read_text()
    except FileNotFoundError:
        old = ""
    kept = _without_key(old.splitlines(keepends=True), "bootstrap")
    if kept and not kept[-1].endswith("\n"):
        kept[-1] += "\n"
    # Before any [table] header, so the key stays top-level.
    at = next((i for i, text in enumerate(kept) if text.lstrip().startswith("[")), len(kept))
    text = "".join([*kept[:at], line, *kept[at:]])
    try:
        if tomllib.loads(text).get("bootstrap") != [str(a) for a in addresses]:
            raise ValueError("the bootstrap key did not take")
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise UserError(f"cannot update {config_file}: {exc}; set bootstrap by hand") from None
    tmp = config_file.with_name(config_file.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(config_file)


_KEY_LINE = re.compile(r"^\s*(?P<key>[A-Za-z0-9_-]+|\"[^\"]*\")\s*=")


def _without_key(lines: list[str], key: str) -> list[str]:
    """``lines`` without the assignment to ``key`` (a multi-line array included)."""
    out: list[str] = []
    depth = 0
    for text in lines:
        if depth > 0:
            depth += _bracket_balance(text)
            continue
        match = _KEY_LINE.match(text)
        if match and match["key"].strip('"') == key:
            depth = max(_bracket_balance(text), 0)
            continue
        out.append(text)
    return out


def _bracket_balance(text: str) -> int:
    """Open minus closed brackets outside strings and comments (a sketch of TOML lexing)."""
    balance, quote = 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#":
            break
        elif char == "[":
            balance += 1
        elif char == "]":
            balance -= 1
    return balance
