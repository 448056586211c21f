# The two commands for a fresh machine (see README): `make demo` and `make test`.
# Each creates .venv and installs the package with every extra on first use (and again when pyproject.toml changes).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed
WORK := build/ci

.PHONY: demo test test-fast test-floors test-base bench notebooks

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llama-rerank demo

# The whole suite (slow tests too), then the two packaging jobs below.
test: $(STAMP)
	$(PY) -m pytest
	$(MAKE) --no-print-directory test-floors test-base

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# Dependency floors: a fresh venv with the lowest version every direct requirement allows (all extras), checked to
# be the declared floors (tests/floors_check.py), then the fast suite against it.
test-floors: $(STAMP)
	rm -rf $(WORK)/floors
	$(UV) venv --quiet --python $(PYTHON) $(WORK)/floors
	$(UV) pip install --quiet --link-mode copy --python $(WORK)/floors/bin/python --resolution lowest-direct -e '.[all]'
	$(WORK)/floors/bin/python tests/floors_check.py
	$(WORK)/floors/bin/python -m pytest -m "not slow" -q -p no:cacheprovider

# The base distribution alone: build wheel and sdist, check their metadata, install the wheel without extras into a
# fresh venv and rerank there with a scripted LLM (tests/base_install_check.py).
test-base: $(STAMP)
	rm -rf $(WORK)/dist $(WORK)/base && mkdir -p $(WORK)
	$(PY) -m build --outdir $(WORK)/dist . > $(WORK)/build.log 2>&1 || (cat $(WORK)/build.log; exit 1)
	$(PY) -m twine check --strict $(WORK)/dist/*
	$(UV) venv --quiet --python $(PYTHON) $(WORK)/base
	$(UV) pip install --quiet --link-mode copy --python $(WORK)/base/bin/python $(WORK)/dist/*.whl
	$(WORK)/base/bin/python tests/base_install_check.py

# Benchmarks (scripts that print tables; see docs/PERFORMANCE.md). embedded.py runs the real local LLM for minutes.
bench: $(STAMP)
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/orchestration.py
	$(PY) benchmarks/embedded.py

# Re-run the notebooks and store their outputs (what readers see on the web).
notebooks: $(STAMP)
	cd notebooks && $(abspath $(VENV))/bin/jupyter-execute --inplace --timeout=900 quickstart.ipynb evaluation.ipynb should_i_rerank.ipynb
