#!/usr/bin/env bash
# `make test`, packed onto a 2-core machine (CI's), in three phases:
#   0. the main venv and the model (MAKE_TARGETs) while the engines' venvs install (pip: mostly
#      one core each; every editable install of specplug takes .editable-install.lock, as they
#      all write specplug.egg-info);
#   1. the in-process tests as two pytest processes (each one torch thread, tests/conftest.py),
#      GROUP_A and GROUP_B below, while the engine installs finish;
#   2. the engine tests, as two pytest processes of about equal length (the vLLM jobs of each fork
#      off one warm vLLM process, integrations/vllm/fork_server.py).  SGLang runs with
#      sleep_on_idle (integrations/sglang/generate.py): before that, each idle SGLang CPU
#      scheduler held a core in a busy loop, and anything beside it crawled.
# Exit status: non-zero if any part failed.
# Usage: tests/run_suite.sh PYTHON [MAKE_TARGET...]: the targets (the main venv, the model) are
# made first, while the engines' venvs start installing (`make engines`).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:?usage: tests/run_suite.sh PYTHON [MAKE_TARGET...]}"
SETUP=("${@:2}")
LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT

# in CI beside the engine installs (s): tests/core + tests/slow ~530, the rest ~510
GROUP_A=(tests/slow tests/core)
GROUP_B=(tests --ignore=tests/slow --ignore=tests/core)
# engine tests in CI (s): vLLM hidden-state ~280, vLLM engine ~140, vLLM sampled ~115, the
# vLLM compare ~90, vLLM converted ~45; all of SGLang ~300 (its children forked, not spawned:
# integrations/sglang/cpu_standins/sitecustomize.py)
ENGINE_TESTS_2=(tests/engines/test_sglang_*.py tests/engines/test_vllm_compare.py
                tests/engines/test_vllm_converted.py)
ENGINE_TESTS_1=(tests)
for f in "${ENGINE_TESTS_2[@]}"; do ENGINE_TESTS_1+=("--ignore=$f"); done

status=0
# pytest_pair MARK LABEL_1 ARRAY_1 LABEL_2 ARRAY_2: two pytest processes side by side (ARRAY_i:
# the name of an array of pytest arguments), each into its own log, printed whole under its label
# once both end, so the output never interleaves; a failure sets status
pytest_pair() {
    local mark="$1" pids=() labels=() i
    shift
    while (($#)); do
        local -n args="$2"  # the array named by $2
        "$PY" -m pytest -q -p no:cacheprovider --durations=12 -m "$mark" "${args[@]}" > "$LOGS/${#labels[@]}.log" 2>&1 &
        pids+=($!) labels+=("$1")
        unset -n args
        shift 2
    done
    for i in "${!pids[@]}"; do wait "${pids[$i]}" || status=1; done
    for i in "${!labels[@]}"; do
        echo "=== ${labels[$i]} ==="
        cat "$LOGS/$i.log"
    done
}

start=$SECONDS
# the install's own end time, printed after phase 1: says whether phase 1 waited on it
{ make --no-print-directory engines > "$LOGS/engines.log" 2>&1; rc=$?
  echo "$SECONDS" > "$LOGS/engines.end"; exit $rc; } &
engines=$!
if ! make --no-print-directory "${SETUP[@]}"; then
    wait $engines
    exit 1
fi
echo "=== phase 0 (main venv, model; the engines' venvs install meanwhile): $((SECONDS - start)) s ==="

start=$SECONDS
pytest_pair "not engine" "in-process tests, group A" GROUP_A "in-process tests, group B" GROUP_B
if ! wait $engines; then
    echo "=== installing the engines failed ===" >&2
    tail -40 "$LOGS/engines.log" >&2
    exit 1
fi
echo "=== phase 1 (in-process tests, and what is left of the engine installs): $((SECONDS - start)) s;" \
    "the engine installs ended $(($(cat "$LOGS/engines.end") - start)) s into it ==="

start=$SECONDS
pytest_pair engine "engine tests, group 1 (vLLM on CPU)" ENGINE_TESTS_1 \
    "engine tests, group 2 (SGLang and vLLM on CPU)" ENGINE_TESTS_2
echo "=== phase 2 (engine tests): $((SECONDS - start)) s ==="
exit $status
