# Two entry points, both from a fresh machine with only Python 3 and pip:
#   make demo   - create .venv, install kerasbn with every extra, run the demo
#   make test   - same environment, run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kerasbn-installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test bench bench-quick venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[all]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python tools/benchmark.py

bench-quick: $(STAMP)
	$(BIN)/python tools/benchmark.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
