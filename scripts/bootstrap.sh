#!/usr/bin/env bash
# Set up this checkout on a fresh Debian machine, then run the demo or the tests:
#   bash scripts/bootstrap.sh demo [ARGS...]   # swarmfs demo ARGS
#   bash scripts/bootstrap.sh test [ARGS...]   # pytest -q ARGS, then ruff
# Installs only what is missing (system packages as root, .venv, the package
# itself), so a second run goes straight to the command and prints nothing else.
set -euo pipefail

usage() {
    echo "usage: bash scripts/bootstrap.sh demo|test|bench [ARGS...]" >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
action=$1
shift
[[ $action == demo || $action == test || $action == bench ]] || usage

cd "$(dirname "$0")/.."

# pyfuse3 ships as source: building it needs gcc, Python headers, pkg-config and libfuse3-dev.
packages=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv rsync git sqlite3 iproute2 nftables)

missing_packages() {
    local package
    for package in "${packages[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
            echo "$package"
        fi
    done
}

if command -v dpkg-query >/dev/null; then
    mapfile -t missing < <(missing_packages)
    if [[ ${#missing[@]} -gt 0 ]]; then
        if [[ $(id -u) -ne 0 ]]; then
            echo "bootstrap: missing packages (install them as root): ${missing[*]}" >&2
            exit 1
        fi
        echo "bootstrap: installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
else
    for tool in fusermount3 pkg-config gcc python3 rsync git sqlite3; do
        command -v "$tool" >/dev/null || echo "bootstrap: warning: $tool not found" >&2
    done
fi

if [[ ! -x .venv/bin/python ]]; then
    echo "bootstrap: creating .venv" >&2
    python3 -m venv .venv
fi

# Reinstall only when the project's metadata changed: pip would otherwise
# rebuild the editable wheel, and reach the network, on every run.
stamp=.venv/.bootstrap-installed
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$wanted" ]]; then
    echo "bootstrap: installing swarmfs and its test tools into .venv" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
    echo "$wanted" >"$stamp"
fi

case $action in
demo)
    exec .venv/bin/swarmfs demo "$@"
    ;;
test)
    .venv/bin/pytest -q "$@"
    .venv/bin/ruff check swarmfs tests
    ;;
bench)
    exec .venv/bin/python contrib/bench/bench.py "$@"
    ;;
esac
