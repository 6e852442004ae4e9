#!/usr/bin/env bash
# `make test`, packed onto a 2-core machine (CI's), in two phases:
#   1. the engines' venvs install (pip: mostly one core) while the in-process tests run as two
#      pytest processes (each one torch thread, tests/conftest.py), GROUP_A and GROUP_B below;
#   2. the engine tests (real vLLM/SGLang subprocesses, two at a time) alone: SGLang's CPU
#      engine slowed badly with other work beside it (phase 2 took over 25 min instead of 14.4
#      when the SmolLM2 and CLI tests ran there).
# Each phase-1 process writes its own log, printed whole when the phase ends, so the output never
# interleaves.  Exit status: non-zero if any part failed.
# Usage: tests/run_suite.sh PYTHON
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:?usage: tests/run_suite.sh PYTHON}"
LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT

GROUP_A=(tests/core tests/slow)
GROUP_B=(tests --ignore=tests/core --ignore=tests/slow)

start=$SECONDS
make --no-print-directory engines > "$LOGS/engines.log" 2>&1 &
engines=$!
"$PY" -m pytest -q -p no:cacheprovider -m "not engine" "${GROUP_A[@]}" > "$LOGS/a.log" 2>&1 &
group_a=$!
"$PY" -m pytest -q -p no:cacheprovider -m "not engine" "${GROUP_B[@]}" > "$LOGS/b.log" 2>&1 &
group_b=$!

status=0
wait $group_a || status=1
wait $group_b || status=1
for name in a b; do
    echo "=== in-process tests, group ${name^^} ==="
    cat "$LOGS/$name.log"
done
if ! wait $engines; then
    echo "=== installing the engines failed ===" >&2
    tail -40 "$LOGS/engines.log" >&2
    exit 1
fi
echo "=== phase 1 (in-process tests + engine installs): $((SECONDS - start)) s ==="

start=$SECONDS
echo "=== engine tests (real vLLM and SGLang on CPU) ==="
"$PY" -m pytest -q -p no:cacheprovider -m engine tests || status=1
echo "=== phase 2 (engine tests): $((SECONDS - start)) s ==="
exit $status
