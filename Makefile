# The two quick-start commands: `make run` and `make test`. Everything else is a step of theirs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test services bench clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "CityBridge needs Python 3.11 or newer"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

## run: the middleware with embedded defaults on http://127.0.0.1:1026
run: $(VENV)/.installed
	$(BIN)/citybridge serve

## test: install test dependencies, start the services the tests need, run the whole suite
test: $(VENV)/.installed-test services
	$(BIN)/python -m pytest -p no:cacheprovider -q

services:
	bash .ci/services

## bench: the benchmarks under bench/ (print figures)
bench: $(VENV)/.installed-test services
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) citybridge-data *.egg-info
