#!/usr/bin/env bash
# `make test`, packed onto a 2-core machine (CI's), in two phases:
#   1. the engines' venvs install (pip: mostly one core) while the in-process tests run as two
#      pytest processes (each one torch thread, tests/conftest.py), GROUP_A and GROUP_B below;
#   2. the engine tests (real vLLM/SGLang subprocesses, two at a time), and beside them GROUP_C
#      (one thread): the engine phase leaves a core idle about 40% of its time (measured: a
#      whole run of 27.5 min used 42 min of CPU, 1.5 cores busy on average).
# Each side process writes its own log, printed whole when its phase ends, so the output never
# interleaves.  Exit status: non-zero if any part failed.
# Usage: tests/run_suite.sh PYTHON
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:?usage: tests/run_suite.sh PYTHON}"
LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT

# phase 1: tests/core (but the CLI) beside everything else in-process (but SmolLM2)
GROUP_A=(tests/core --ignore=tests/core/test_cli.py)
GROUP_B=(tests --ignore=tests/core --ignore=tests/slow)
# phase 2, beside the engines: SmolLM2 and the CLI (its tests wait on `specplug` subprocesses)
GROUP_C=(tests/slow tests/core/test_cli.py)

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
"$PY" -m pytest -q -p no:cacheprovider -m "not engine" "${GROUP_C[@]}" > "$LOGS/slow.log" 2>&1 &
slow=$!
echo "=== engine tests (real vLLM and SGLang on CPU) ==="
"$PY" -m pytest -q -p no:cacheprovider -m engine tests || status=1
wait $slow || status=1
echo "=== SmolLM2 and CLI checks ==="
cat "$LOGS/slow.log"
echo "=== phase 2 (engine tests + SmolLM2 and CLI checks): $((SECONDS - start)) s ==="
exit $status
