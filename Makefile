# The two commands for a fresh machine (see README): `make demo` and `make test`.
# Each creates .venv and installs the package with every extra on first use (and again when pyproject.toml changes).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench notebooks

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[local,eval,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llama-rerank demo

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# Benchmarks (scripts that print tables; see docs/PERFORMANCE.md). embedded.py runs the real local LLM for minutes.
bench: $(STAMP)
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/orchestration.py
	$(PY) benchmarks/embedded.py

# Re-run the notebooks and store their outputs (what readers see on the web).
notebooks: $(STAMP)
	cd notebooks && $(abspath $(VENV))/bin/jupyter-execute --inplace --timeout=900 quickstart.ipynb evaluation.ipynb
