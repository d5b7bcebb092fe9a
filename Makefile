# The two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes in first and pinned: a bare `torch` requirement would download whatever build
# PyPI has (several GB). These two lie on the local disk of our dev/CI machines (a CUDA build
# that runs on the CPU) and torchvision (needed by timm) must match torch exactly; elsewhere pip
# downloads them. Override TORCH_SPEC for another platform, e.g. a CPU-only wheel index.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean sample gpu-carry

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/radjepa demo --out demo-output

lint: $(STAMP)
	$(BIN)/ruff check radjepa pipelines serve bench tests scripts
	$(BIN)/ruff format --check radjepa pipelines serve bench tests scripts

clean:
	rm -rf $(VENV) runs demo-output .pytest_cache

# Rebuild the bundled DICOM sample from the NIH images beside the checkout (already committed).
sample: $(STAMP)
	$(BIN)/python scripts/build_sample.py --nih ../shared/data/nih-cxr14-621 --out data/sample

# What a lent GPU machine needs beside the checkout for bench/gpu_suite.py (docs/PERFORMANCE.md).
gpu-carry: $(STAMP)
	VENV_PY=$(BIN)/python bash scripts/gpu_carry.sh
