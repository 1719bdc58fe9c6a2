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

## demo: the pipeline on the shipped demo pair (harvest -> train -> index -> top), into demo-out/
PAIR := examples/toy-pair
demo: $(STAMP)
	rm -rf demo-out && mkdir -p demo-out
	$(VENV)/bin/tca harvest --base $(PAIR)/base --target $(PAIR)/reasoning \
		--data $(PAIR)/data/train.jsonl --out demo-out/store --max-tokens 60000
	$(VENV)/bin/tca cache info demo-out/store
	$(VENV)/bin/tca train --cache demo-out/store --out demo-out/adapters \
		--device cpu   # sizes scale to the store: 128 features, batch 128, 4 epochs
	$(VENV)/bin/tca index --cache demo-out/store --adapters demo-out/adapters --out demo-out/index.duckdb
	$(VENV)/bin/tca sql demo-out/index.duckdb \
		"SELECT layer, feature, n_active, round(max, 3) AS max FROM features ORDER BY n_active DESC LIMIT 10"
	$(VENV)/bin/tca top demo-out/index.duckdb 2 \
		"$$($(VENV)/bin/tca sql demo-out/index.duckdb --format csv \
		   "SELECT feature FROM features_on('Wait', layer := 2) LIMIT 1" | tail -n 1)" -k 5

clean-venv:
	rm -rf $(VENV)

## cli-docs: regenerate docs/cli.md from the commands' --help
cli-docs: $(STAMP)
	COLUMNS=100 $(PY) docs/make_cli_md.py > docs/cli.md
