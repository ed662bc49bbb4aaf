# nanoseek: `make serve` runs the main job (the chatbot: web app + API on the shipped model),
# `make test` runs the whole test suite.
# Both create .venv on first use: torch is pinned first (a bare `torch` requirement would
# pull a multi-GB CUDA build on a CPU machine), then the package; `make test` and `make bench`
# add the test extras (transformers, lm-eval, the client SDKs, playwright: ~100 more packages
# that serving does not need).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TEST_STAMP := $(VENV)/.installed-test-stamp
TORCH  ?= torch==2.13.0

.PHONY: serve demo speedrun test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(TEST_STAMP)

serve: $(STAMP)  ## the chatbot: web app at http://127.0.0.1:8000 and the OpenAI/DeepSeek API at /v1
	$(BIN)/nanoseek serve

demo: $(STAMP)  ## build, save, reload and generate with a tiny random DeepSeek-V3 model
	$(BIN)/nanoseek demo

speedrun: $(STAMP)  ## reproduce the shipped model: the whole pipeline in about 30 minutes on a laptop CPU
	$(BIN)/nanoseek speedrun --rl-tasks add,countdown --ship

test: $(TEST_STAMP)  ## the whole suite
	$(BIN)/python -m pytest -q -n auto

test-fast: $(TEST_STAMP)  ## skip tests marked slow
	$(BIN)/python -m pytest -q -n auto -m "not slow"

bench: $(TEST_STAMP)  ## training and generation speed against transformers, interleaved in one process
	$(BIN)/python bench/train_throughput.py --step --config cpu-tiny --seq 512
	$(BIN)/python bench/generate_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache
