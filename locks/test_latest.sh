#!/usr/bin/env bash
# `make test-latest`: the fast tests against the newest releases setup.py allows (no lock), in
# .venv-latest.  It first lists every package whose newest version differs from locks/main.txt,
# so a failure below names the release that caused it.  Exit status: pytest's.  The newest
# torch on PyPI is its CUDA build (about 6 GB with its libraries); it runs the CPU tests too.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv-latest"
PY="${PYTHON:-python3}"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade --upgrade-strategy eager)

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"${PIP[@]}" torch
"${PIP[@]}" -e "$REPO[test,models]"
"${PIP[@]}" --no-deps $(sed -n 's/^ASSET_PKGS := //p' "$REPO/Makefile")

echo "== newest releases that differ from locks/main.txt =="
"$VENV/bin/python" - "$REPO/locks/main.txt" <<'PY'
import re
import sys
from importlib.metadata import PackageNotFoundError, version

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

changed = 0
for line in open(sys.argv[1]):
    if "==" not in line or line.startswith("#"):
        continue
    name, locked = line.strip().split("==", 1)
    try:
        now = version(name)
    except PackageNotFoundError:
        now = "(not installed)"
    if now.split("+")[0] != locked.split("+")[0]:
        changed += 1
        print(f"  {norm(name):24s} lock {locked:14s} newest {now}")
print(f"  {changed} package(s) differ" if changed else "  none: the lock is current")
PY
echo "== make test-fast against them =="
cd "$REPO"
"$VENV/bin/python" -m pytest -q -m "not slow and not engine" tests
