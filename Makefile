# nanoseek: `make demo` runs the main job, `make test` runs the whole test suite.
# Both create .venv on first use: torch is pinned first (a bare `torch` requirement would
# pull a multi-GB CUDA build on a CPU machine), then the package and its test extras.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TORCH  ?= torch==2.13.0

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)  ## build, save, reload and generate with a tiny DeepSeek-V3 model
	$(BIN)/nanoseek demo

test: $(STAMP)  ## the whole suite
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  ## skip tests marked slow
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)  ## training throughput against transformers, interleaved in one process
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache
