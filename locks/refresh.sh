#!/usr/bin/env bash
# `make lock`: re-resolve every environment specplug installs, newest releases allowed by
# setup.py and the install scripts' top-level pins, and write what got installed to locks/*.txt.
# Runs in throwaway venvs under a temp dir, so the working venvs are untouched; afterwards
# `make test` installs exactly these versions.  Review the diff before committing a new lock.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d /tmp/specplug-lock.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
PY="${PYTHON:-python3}"

freeze() {  # venv, output file: every installed distribution except specplug itself
    {
        echo "# written by make lock ($(date -u +%Y-%m-%d)) from $(basename "$2" .txt)'s install; do not edit"
        "$1/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check \
            | grep -v -i '^specplug' | sed -E 's/^(torch==[^+]*)\+cpu$/\1/'
    } > "$2.new"
    mv "$2.new" "$2"
    echo "wrote $2 ($(grep -vc '^#' "$2") packages)"
}

# the main .venv: what the Makefile installs, without the lock
"$PY" -m venv "$WORK/main"
"$WORK/main/bin/pip" install -q --disable-pip-version-check "$(sed -n 's/^TORCH_PIN := //p' "$REPO/Makefile")"
"$WORK/main/bin/pip" install -q --disable-pip-version-check -e "$REPO[test,models]"
"$WORK/main/bin/pip" install -q --disable-pip-version-check --no-deps \
    $(sed -n 's/^ASSET_PKGS := //p' "$REPO/Makefile")
freeze "$WORK/main" "$REPO/locks/main.txt"

# the engine venvs: their install scripts with the lock switched off
SPECPLUG_LOCK=none "$REPO/integrations/vllm/install_cpu.sh" "$WORK/vllm"
freeze "$WORK/vllm" "$REPO/locks/vllm.txt"
SPECPLUG_LOCK=none bash "$REPO/integrations/sglang/install_cpu.sh" "$WORK/sglang"
freeze "$WORK/sglang" "$REPO/locks/sglang.txt"
