# Each target sets itself up from nothing: the virtual environment is created when missing
# and the project installed into it (the CPU build of torch, pinned).
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.tca-installed

.PHONY: test test-fast demo cli-docs clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

## test: the whole suite (the command CI runs); Triton kernels run in the interpreter on CPU
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest

## test-fast: everything but the slow tests that use the shipped demo pair
test-fast: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -m "not slow"

## demo: the whole pipeline on the shipped demo pair (tca demo), into demo-out/
demo: $(STAMP)
	$(VENV)/bin/tca demo --out demo-out --overwrite

clean-venv:
	rm -rf $(VENV)

## gpu-check: first thing on a CUDA machine: tests, kernel/harvest/train figures into gpu-check.json in 4 min (ARGS=--quick: 2), installing nothing
.PHONY: gpu-check
gpu-check:
	$(PY) bench/gpu_check.py $(ARGS)

## cli-docs: regenerate docs/cli.md from the commands' --help
cli-docs: $(STAMP)
	COLUMNS=100 $(PY) docs/make_cli_md.py > docs/cli.md
