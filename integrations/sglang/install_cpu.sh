#!/usr/bin/env bash
# Create a separate venv with SGLang 0.5.23 plus specplug (editable), for the SGLang engine tests
# on CPU.  Kept out of the main venv: SGLang brings its own pins and ~2.5 GB.
# Usage: integrations/sglang/install_cpu.sh [VENV]   (default /work/main/.venv-sglang)
# Idempotent: a marker file records a finished install; delete it (or the venv) to redo.
#
# sglang==0.5.23 pins torch 2.14.1 and CUDA-only kernels (sglang-kernel, flashinfer, ...), so it
# goes in --no-deps over the list below, which holds what its CPU path imports.  The few
# sgl_kernel ops and the torchvision names it also needs come from specplug's CPU stand-ins
# (integrations/sglang/cpu_standins), which specplug puts on SGLang's PYTHONPATH itself.
# GPU machines: `pip install 'specplug[sglang]'` instead.
# Installs exactly locks/sglang.txt; SPECPLUG_LOCK=none resolves the list afresh (`make lock`).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$REPO/.venv-sglang}"
MARKER="$VENV/.specplug-sglang-installed"
SGLANG_PIN="sglang==0.5.23"
PY="${PYTHON:-python3}"
PINS=(
    torch==2.13.0 triton==3.7.1 transformers==5.19.0 tokenizers==0.23.2 xgrammar==0.2.7
    apache-tvm-ffi==0.1.11 "llguidance>=1.7.6,<2" fastapi "uvicorn>=0.51" uvloop orjson msgspec
    "pyzmq>=25.1.2" openai==2.8.0 anthropic openai-harmony==0.0.4 pybase64 partial_json_parser
    python-multipart "prometheus-client>=0.20" setproctitle einops interegular xxhash zstandard
    pillow scipy IPython distro easydict watchfiles sentencepiece tiktoken dill
    compressed-tensors gguf aiohttp requests psutil pydantic packaging regex numpy tqdm
    safetensors huggingface_hub python-dateutil jsonschema
    soundfile==0.13.1
)
LOCK="${SPECPLUG_LOCK:-$REPO/locks/sglang.txt}"
STAMP="$SGLANG_PIN ${PINS[*]} $([[ "$LOCK" == none ]] && echo unlocked || sha256sum < "$LOCK")"

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$STAMP" ]]; then
    exit 0
fi

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [[ "$LOCK" == none ]]; then
    "${PIP[@]}" "${PINS[@]}"
    "${PIP[@]}" --no-deps "$SGLANG_PIN"
else
    "${PIP[@]}" --no-deps -r "$LOCK"
fi
# every editable install writes the repo's specplug.egg-info: one at a time (make test runs
# this beside the main venv's install)
(flock 9 && "${PIP[@]}" --no-deps -e "$REPO") 9> "$REPO/.editable-install.lock"
"$VENV/bin/python" -c "import sglang, specplug; print('sglang', sglang.__version__, 'ready in $VENV')"
echo "$STAMP" > "$MARKER"
